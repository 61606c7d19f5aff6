"""One experiment on one outer fold: train (or resume, or skip), then predict the test fold.

run_fold(cfg, study, experiment, fold) writes runs/<experiment>/fold<k>/: history.csv,
predictions.csv (one row per test tuple), results.json (what only training knows: threshold,
epochs, timings), and the fold's model to models/<experiment>/fold<k>.pt. Every metric is computed later, by the report, from the files.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from preprocess.dataset import evaluation_samples, fold_split, samples_for, sampling_weights, training_samples, tuples_per_epoch
from preprocess.splits import folds_fingerprint
from preprocess.stain import stain_normaliser
from utils.device import derived_seed, empty_cache, is_out_of_memory, seed_everything
from utils.engine.batchnorm import settle_batchnorm
from utils.engine.checkpoint import (
    FoldState,
    cpu_copy,
    finished_results,
    load_saved_state,
    reload_last,
    restore_from_disk,
    saved_state,
    tested_model,
)
from utils.engine.evaluate import evaluation_batch, prediction_frame
from utils.engine.fold_run import NO_PROGRESS, FoldRun, checkpoint_due, kept_write, save_checkpoints
from utils.engine.graphs import evaluation_graphs, graph_blocker, whole_batches
from utils.engine.losses import StudyLoss, binary_loss, subtype_class_weights
from utils.engine.saving import BackgroundWriter, scalar_writer
from utils.engine.stain_reference import reference_key, shared_reference
from utils.engine.stop import StopRequested, stop_requested
from utils.engine.train import EpochPlan, EpochResult, LoopSettings, new_fold_state, predict, train_one_epoch
from utils.experiments import is_selection_job, job_place
from utils.files import ATTENTION_FILE, atomic_write_text
from utils.metrics import DECISION_THRESHOLD, choose_threshold, fold_metrics, patient_probabilities

log = logging.getLogger("mmnet")


def _start_epoch(state: FoldState, run: FoldRun, count: int) -> EpochPlan:
    """Seeds, tuples and augmentation generator of the epoch; a mid-epoch resume re-applies the
    RNG states saved at the stop, so the rest of the epoch is what it would have been."""
    cfg, fold = run.cfg, run.fold
    seed_everything(derived_seed(cfg.seed, fold, state.epoch))  # resumable: seeds depend on epoch only
    rng = np.random.default_rng(derived_seed(cfg.seed, fold, state.epoch, 1))
    gen = torch.Generator(device=run.study.env.device).manual_seed(derived_seed(cfg.seed, fold, state.epoch, 2))
    tuples, owners = training_samples(run.split["train"], count, rng, cfg)
    if state.saved_rng:
        torch.set_rng_state(state.saved_rng["torch"])
        if "cuda" in state.saved_rng and run.study.env.device == "cuda":  # onto whichever GPU resumes
            torch.cuda.set_rng_state(state.saved_rng["cuda"])
        gen.set_state(state.saved_rng["augment"])
        state.saved_rng = None
    return EpochPlan(tuples, owners, gen, state.epoch, state.step, state.partial_losses)


class _ReplayEpoch(Exception):
    """Restart the epoch from the last checkpoint (after an out-of-memory)."""


def _epoch_or_replay(state: FoldState, loop: LoopSettings, plan: EpochPlan) -> EpochResult:
    """One epoch; a CUDA out-of-memory instead halves the micro-batch (gradient accumulation
    keeps the effective batch) and asks for the epoch to be replayed from its checkpoint."""
    try:
        return train_one_epoch(state, loop, plan)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one; is_out_of_memory() tells the rest apart
        if state.accumulation >= loop.batch_size or not is_out_of_memory(exc):
            raise
        state.accumulation *= 2
        log.warning("out of memory: retrying epoch %d with micro-batches of %d (x%d accumulation)",
                    plan.epoch + 1, math.ceil(loop.batch_size / state.accumulation), state.accumulation)
        empty_cache(loop.source.device.type)
        raise _ReplayEpoch from None


def _validate(state: FoldState, run: FoldRun, val_tuples, val_owners) -> dict:
    """Inner-validation AUC and the binary training loss on those patients (the same quantity
    as train_binary_loss), plain view, of the candidate settled as it would be tested; empty
    when no epoch is chosen (--model-selection last)."""
    if val_tuples is None:
        return {}
    env = run.study.env
    _settle(state, run, tested_model(state))
    out = predict(tested_model(state), run.study.source, val_tuples, evaluation_batch(run.cfg, env), env.amp_dtype,
                  tta=False, graphs=evaluation_graphs(run.cfg.cuda_graphs, env.device, run.cfg.sample_mode))
    labels = run.split["val"].labels[val_owners]
    loss = binary_loss(run.cfg, torch.logit(torch.from_numpy(out["prob"]).double(), eps=1e-7),
                       torch.from_numpy(labels))
    return {"val_loss": float(loss), "val_auc": float(roc_auc_score(labels, out["prob"]))}


def _settle(state: FoldState, run: FoldRun, model: torch.nn.Module) -> bool:
    """`model` gets the BatchNorm statistics of what training fed it (the fold's training
    tuples with their magnification-dropout masks, at training's micro-batch) before it is
    validated, tested or kept; the same fixed draw for every candidate of the fold."""
    micro = math.ceil(samples_for(run.cfg, run.study.env.batch_size) / state.accumulation)
    return settle_batchnorm(model, source=run.train_source, data=run.split["train"], cfg=run.cfg, batch=micro,
                            amp_dtype=run.study.env.amp_dtype, seed=derived_seed(run.cfg.seed, run.fold, 4))


def _improved(state: FoldState, run: FoldRun, val: dict) -> bool:
    """Inner validation: a better AUC (loss breaks ties). Fixed budget: the final epoch."""
    if not val:
        return state.epoch + 1 == run.cfg.epochs
    return val["val_auc"] > state.best_auc + 1e-4 or (
        abs(val["val_auc"] - state.best_auc) <= 1e-4 and val["val_loss"] < state.best_loss)


def _record_epoch(state: FoldState, run: FoldRun, result: EpochResult, val: dict) -> None:
    """Keep the weights to test (best inner-validation epoch, or the last), log, checkpoint."""
    epoch = state.epoch
    improved = _improved(state, run, val)
    if improved:
        state.best_auc, state.best_loss = val.get("val_auc", -1.0), val.get("val_loss", float("inf"))
        state.best_epoch, state.bad_epochs = epoch, 0
        state.best_weights, run.best_unsaved = cpu_copy(saved_state(tested_model(state))), True
    elif val:
        state.bad_epochs += 1
    row = {"epoch": epoch, "train_loss": result.loss, **result.parts, **val,
           "lr": state.scheduler.get_last_lr()[-1],
           "tuples_per_s": result.tuples / result.seconds, "seconds": result.seconds, "best": improved}
    state.history.append(row)
    state.epoch = epoch + 1
    run.progress.epoch_done(run.name, run.fold, epoch, run.cfg.epochs)
    if run.scalars is not None:
        for key in ("train_loss", "train_binary_loss", "train_subtype_loss", "val_loss", "val_auc", "lr", "tuples_per_s"):
            if key in row:
                run.scalars.add_scalar(key, row[key], epoch + 1)
        run.scalars.flush()
    if checkpoint_due(state, run):
        save_checkpoints(state, run)
    scores = f" | val auc {val['val_auc']:.4f} loss {val['val_loss']:.4f}" if val else ""
    log.info("%s fold %d epoch %d/%d | loss %.4f%s | %.0f tuples/s%s", run.name, run.fold, epoch + 1,
             run.cfg.epochs, result.loss, scores, row["tuples_per_s"], " *" if improved and val else "")


def _fold_loop(state: FoldState, run: FoldRun) -> LoopSettings:
    """The fold's loop settings; with --cuda-graphs on, a line when the step cannot be recorded."""
    cfg, env = run.cfg, run.study.env
    blocker = graph_blocker(cfg.cuda_graphs, env.device, env.amp_dtype, state.accumulation)
    if blocker:
        log.info("%s fold %d: --cuda-graphs on, trained without graphs: %s", run.name, run.fold, blocker)
    return LoopSettings(run.train_source, run.split["train"],
                        StudyLoss(cfg, subtype_class_weights(run.split["train"].subtypes, sampling_weights(
                            run.split["train"], cfg.class_balanced))),
                        samples_for(cfg, env.batch_size), env.amp_dtype, cfg.grad_clip, (cfg.colour_jitter, cfg.stain_jitter),
                        stop_requested, cfg.quarter_turns, graphs=cfg.cuda_graphs == "on" and not blocker)


def _train_epochs(state: FoldState, run: FoldRun) -> None:
    cfg = run.cfg
    loop = _fold_loop(state, run)
    val_tuples, val_owners = evaluation_samples(run.split["val"], cfg) if "val" in run.split else (None, None)
    count = tuples_per_epoch(run.split["train"], cfg)
    if loop.graphs:  # every step the recorded shape
        count = whole_batches(count, loop.batch_size)
    while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
        plan = _start_epoch(state, run, count)
        try:
            result = _epoch_or_replay(state, loop, plan)
        except _ReplayEpoch:
            run.writer.wait()
            reload_last(state, run.run_dir, run.fresh_state)
            continue
        if result.stopped_at is not None:
            state.step, state.partial_losses = result.stopped_at, result.losses
            save_checkpoints(state, run, plan.generator)
            run.writer.wait()
            raise StopRequested(f"{run.name} fold {run.fold} epoch {plan.epoch + 1} step {state.step}")
        state.step, state.partial_losses = 0, None
        _record_epoch(state, run, result, _validate(state, run, val_tuples, val_owners))


def _predictions(state: FoldState, run: FoldRun, role: str) -> pd.DataFrame:
    """The split's prediction frame; the test fold's also magnification importance, and for
    MIL models attention.csv (each test image's attention)."""
    tested = role == "test" and not is_selection_job(run.cfg, run.fold)  # a selection job's test is only scored
    frame, attention = prediction_frame(state.model, run.study, run.cfg, run.split[role], tested)
    if attention is not None and tested:
        attention.to_csv(run.run_dir / ATTENTION_FILE, index=False)
    return frame


def fold_identity(cfg, study, fold: int) -> dict:
    """What a finished fold or a checkpoint must match to be reused: the training settings and
    this fold's own split (adding CV repeats leaves the first repetition's folds valid)."""
    identity = {"config_hash": cfg.training_hash(), "folds_hash": folds_fingerprint(study.folds, fold)}
    if (stain := reference_key(cfg, study, fold)) is not None:
        identity["stain_reference"] = stain
    return identity


def _open_fold(cfg, study, experiment: str, fold: int, identity: dict, progress) -> FoldRun:
    run_dir = Path(cfg.output_dir) / "runs" / experiment / f"fold{fold}"
    run_dir.mkdir(parents=True, exist_ok=True)
    split = fold_split(study.index, study.usable, study.folds, fold, cfg)
    steps = math.ceil(tuples_per_epoch(split["train"], cfg) / samples_for(cfg, study.env.batch_size))
    stain = shared_reference(cfg, study, fold)  # one per outer fold, shared by every experiment
    run = FoldRun(cfg, study, experiment, fold, split, run_dir, identity, BackgroundWriter(),
                  lambda: new_fold_state(cfg, study.env, steps, derived_seed(cfg.seed, fold), stain),
                  progress, scalar_writer(cfg, experiment, fold))
    run.train_source = normalised_once(cfg, study.source, stain)
    return run


def normalised_once(cfg, source, stain: dict | None):
    """The source training reads: with a stain reference, every image normalised once for the
    fold (not every batch of every epoch again); validation and test read the raw images and
    normalise them in the model's own path, exactly as the predictor and the exported model do."""
    if stain is None:
        return source
    normaliser = stain_normaliser(cfg.stain_method())
    normaliser.load_state_dict(stain)
    return source.stain_normalised(normaliser)


def _finish(state: FoldState, run: FoldRun, started: float) -> dict:
    """Test predictions and results.json. Decisions are at 0.5 (training is class-balanced);
    the threshold chosen on inner validation is kept for a secondary row only."""
    load_saved_state(state.model, state.best_weights)
    settled = _settle(state, run, state.model)
    if settled:
        state.best_weights = cpu_copy(saved_state(state.model))
    run.writer.submit(kept_write(state, run))  # written while the test fold is predicted
    val_threshold = None  # a secondary rule, only where inner-validation patients exist
    if "val" in run.split:
        val = patient_probabilities(_predictions(state, run, "val"))
        val_threshold = choose_threshold(val["label"], val["prob"])
    predictions = _predictions(state, run, "test")
    predictions.to_csv(run.run_dir / "predictions.csv", index=False)
    pd.DataFrame(state.history).to_csv(run.run_dir / "history.csv", index=False)
    threshold = DECISION_THRESHOLD
    training = np.concatenate([run.split[r].labels for r in ("train", "val") if r in run.split])
    results = {"experiment": run.name, "fold": run.fold, **job_place(run.cfg, run.fold), **run.identity,
               "threshold": threshold,
               "val_threshold": val_threshold,
               "train_prevalence": float(training.mean()),  # malignant share of the training patients
               "best_epoch": state.best_epoch, "epochs_run": state.epoch,
               "resumed_at_epoch": run.resumed_at,  # a resumed fold trained only the epochs after it
               "train_seconds": sum(h["seconds"] for h in state.history),
               "wall_seconds_this_run": time.perf_counter() - started,
               "pretrained": getattr(state.model, "pretrained_status", ""),
               "accumulation": state.accumulation,  # >1 after a CUDA out-of-memory
               "batchnorm_settled": settled,  # running statistics re-estimated on the training patients
               "patients": {r: len(run.split[r]) for r in run.split}}
    run.writer.wait()  # the kept model lands before results.json marks the fold finished
    atomic_write_text(run.run_dir / "results.json", json.dumps(results, indent=2))
    m = fold_metrics(predictions, threshold)["patient"]
    log.info("%s fold %d done: patient acc %.3f bal-acc %.3f auc %.3f (threshold %.3f, best epoch %d)",
             run.name, run.fold, m["accuracy"], m["balanced_accuracy"], m["auc"], threshold, state.best_epoch + 1)
    return results


def run_fold(cfg, study, experiment: str, fold: int, progress=NO_PROGRESS) -> dict:
    """Train one experiment on one fold (or resume it, or return its finished results);
    `progress` hears of the fold's start, each epoch and its end."""
    identity = fold_identity(cfg, study, fold)
    run_dir = Path(cfg.output_dir) / "runs" / experiment / f"fold{fold}"
    if (done := finished_results(run_dir, identity, cfg.resume)) is not None:
        log.info("%s fold %d: finished earlier, skipped (config %s)", experiment, fold, identity["config_hash"])
        progress.end_job(experiment, fold, False)
        return done
    run = _open_fold(cfg, study, experiment, fold, identity, progress)
    state, started = run.fresh_state(), time.perf_counter()
    run.last_saved = time.monotonic()
    if cfg.resume and restore_from_disk(state, run.run_dir, run.identity):
        log.info("%s fold %d: resuming at epoch %d step %d", experiment, fold, state.epoch + 1, state.step)
    run.resumed_at = state.epoch  # the ETA counts only the epochs trained in this run
    progress.start_job(experiment, fold, run.resumed_at / cfg.epochs)
    try:
        _train_epochs(state, run)
    finally:  # also on an interrupt: the last submitted checkpoint lands whole before we leave
        run.writer.wait()
        if run.scalars is not None:
            run.scalars.close()
    results = _finish(state, run, started)
    # A finished fold is skipped on restart and needs only its kept model: what a stop or the
    # timer left to resume from (last.pt, ~0.5 GB for four resnet18s; best.pt) is removed.
    for name in ("last.pt", "best.pt"):
        (run.run_dir / name).unlink(missing_ok=True)
    progress.end_job(experiment, fold, True)
    return results


def is_finished(cfg, study, experiment: str, fold: int) -> bool:
    """A finished fold of this very run (same identity) that run_fold would skip."""
    run_dir = Path(cfg.output_dir) / "runs" / experiment / f"fold{fold}"
    return finished_results(run_dir, fold_identity(cfg, study, fold), cfg.resume) is not None
