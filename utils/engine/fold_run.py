"""One experiment x fold being trained: where it writes, what it trains on, whom it tells of
its progress, and its checkpoint writes (last.pt to resume, best.pt for the tested weights)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from backbones.encoder import fingerprint, frozen_encoder
from utils.engine.checkpoint import FoldState, checkpoint_payload, config_json
from utils.engine.saving import BackgroundWriter
from utils.experiments import is_selection_job
from utils.files import model_file


class NoProgress:
    """Where a fold reports when no study watches it (tests, the benchmark, worker processes);
    a study passes its StudyProgress, which has the same three methods."""

    def start_job(self, *args) -> None: ...
    def epoch_done(self, *args) -> None: ...
    def end_job(self, *args) -> None: ...


NO_PROGRESS = NoProgress()


@dataclass
class FoldRun:
    """One experiment x fold being trained: where it writes and what it trains on."""
    cfg: object  # the experiment's Config
    study: object  # utils.study.pipeline.Study with images attached
    name: str  # experiment name
    fold: int
    split: dict  # role -> PatientImages
    run_dir: Path
    identity: dict  # config and folds hashes: a checkpoint of another run is refused
    writer: BackgroundWriter
    fresh_state: Callable[[], FoldState]  # the fold's initial state, rebuilt on demand
    progress: object = NO_PROGRESS  # told of each epoch (a study's StudyProgress)
    scalars: object = None  # a TensorBoard SummaryWriter with --tensorboard
    last_saved: float = 0.0  # time.monotonic() of the last last.pt written
    resumed_at: int = 0  # the epoch this run started at (0 unless resumed)
    best_unsaved: bool = False  # best weights changed since best.pt was last written
    train_source: object = None  # what training and BatchNorm settling read: the fold's stain-normalised copy, or study.source


def save_checkpoints(state: FoldState, run: FoldRun, generator: torch.Generator | None = None) -> None:
    """last.pt (everything to resume) and, when the best weights changed, best.pt, written in
    the background. On a timer, at a stop request and at the end of a fold's training: a
    four-backbone last.pt is ~0.5 GB, too much to write every epoch to a network volume."""
    writes = [(checkpoint_payload(state, run.identity, generator), run.run_dir / "last.pt")]
    if run.best_unsaved:
        writes.append(best_write(state, run))
    run.writer.submit(writes)
    run.last_saved = time.monotonic()


def best_write(state: FoldState, run: FoldRun) -> tuple[dict, Path]:
    """best.pt: the weights that are tested and kept, with what rebuilds the model."""
    run.best_unsaved = False
    return ({"model": state.best_weights, "epoch": state.best_epoch, "config_json": config_json(run.cfg),
             **encoder_identity(state.model, run.cfg.backbone), **run.identity}, run.run_dir / "best.pt")


def encoder_identity(model: torch.nn.Module, backbone: str) -> dict:
    """What a kept model needs of the frozen encoder it leaves out: the encoder's name and the
    fingerprint of its weights (empty for a fine-tuned model, whose file holds its encoder)."""
    encoder = frozen_encoder(model)
    if encoder is None:
        return {}
    return {"encoder": {"backbone": backbone, "fingerprint": fingerprint(encoder)}}


def checkpoint_due(state: FoldState, run: FoldRun) -> bool:
    """last.pt on the timer while epochs remain. At the end of training nothing to resume is
    written: the fold's end writes only the model it keeps (kept_write), while it predicts."""
    finished = state.epoch >= run.cfg.epochs or state.bad_epochs >= run.cfg.patience
    return not finished and time.monotonic() - run.last_saved >= 60 * run.cfg.checkpoint_minutes


def kept_write(state: FoldState, run: FoldRun) -> list[tuple[dict, Path]]:
    """The tested weights as the fold model under models/, for the experiments whose models are
    kept (--keep-models: all, or MMNet and the MIL models whose Grad-CAM the report draws)."""
    cfg = run.cfg
    if not (cfg.keep_models == "all" or run.name == "mmnet" or cfg.sample_mode == "bag") or is_selection_job(cfg, run.fold):
        return []  # a selection job is only scored: its model is never used again
    payload, _ = best_write(state, run)
    return [(payload, model_file(cfg.output_dir, run.name, run.fold))]
