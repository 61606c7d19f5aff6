"""Fold state and its checkpoints: what is saved, how it is restored, when it is refused."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from backbones.encoder import frozen_prefixes
from utils.engine.saving import load_checkpoint

log = logging.getLogger("mmnet")


class ForeignRunError(RuntimeError):
    """output/ holds a fold trained with another config or other folds: never reused silently."""


@dataclass
class FoldState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    epoch: int = 0  # next epoch to run
    best_auc: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = None
    best_weights: dict = None
    step: int = 0  # >0: the epoch was stopped after this many steps
    partial_losses: list = None
    saved_rng: dict = None  # RNG states at a mid-epoch stop, re-applied on resume
    accumulation: int = 1  # micro-batches per step (from device memory); doubled after an out-of-memory
    average: torch.nn.Module = None  # --ema-epochs: the moving average of the weights (an AveragedModel)
    graphed: object = None  # --cuda-graphs: the recorded update (utils.engine.graphs.GraphedStep); never saved


def tested_model(state: FoldState) -> torch.nn.Module:
    """The network whose weights are validated and kept: the moving average where there is one."""
    return state.average.module if state.average is not None else state.model


def config_json(cfg) -> str:
    """The fold's config inside its checkpoint: the model can be rebuilt from the file alone."""
    return json.dumps(dataclasses.asdict(cfg))


def cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def saved_state(module: torch.nn.Module) -> dict:
    """A model's (or moving average's) state dict without its frozen encoder: checkpoints, best
    weights and kept fold models hold the trainable parts; the encoder is rebuilt from its name
    and checked against its fingerprint (utils.engine.inference.load_fold_model)."""
    skip = tuple(frozen_prefixes(module))
    state = module.state_dict()
    return {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state


def load_saved_state(module: torch.nn.Module, weights: dict) -> None:
    """load_state_dict of a saved_state: strict, except for the frozen encoder's entries."""
    missing, unexpected = module.load_state_dict(weights, strict=False)
    skip = tuple(frozen_prefixes(module))
    missing = [k for k in missing if not (skip and k.startswith(skip))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def checkpoint_payload(state: FoldState, identity: dict, generator: torch.Generator | None = None) -> dict:
    """Tensors and plain values only: torch.load(weights_only=True) reads it back."""
    _, key, position, has_gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64)),
           "numpy_rest": [int(position), int(has_gauss), float(cached)]}
    if next(state.model.parameters()).is_cuda:  # the one GPU this job trains on, not every visible one
        rng["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        rng["augment"] = generator.get_state()
    return {"model": saved_state(state.model), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "rng": rng, "epoch": state.epoch, "best_auc": state.best_auc,
            "best_loss": state.best_loss, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "history": state.history, "step": state.step,
            "partial_losses": state.partial_losses, "accumulation": state.accumulation,
            **({"average": saved_state(state.average)} if state.average is not None else {}), **identity}


def restore_average(average, saved: dict) -> None:
    """A moving average from its state dict; whether it has started is read once, here, so
    no training step reads it from the device (utils.engine.train.update_average)."""
    load_saved_state(average, saved)
    average.started = int(saved["n_averaged"]) > 0


def restore(state: FoldState, payload: dict, best: dict | None) -> None:
    load_saved_state(state.model, payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])  # new state tensors: a recorded update is stale
    state.graphed = None
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    if state.average is not None:
        restore_average(state.average, payload["average"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy_key"].numpy().astype(np.uint32), *rng["numpy_rest"]))
    # Not the accumulation: the micro-batch belongs to the device that resumes (another GPU
    # may hold more); the step, and so the result, is the same batch either way.
    for key in ("epoch", "best_auc", "best_loss", "best_epoch", "bad_epochs", "history", "step",
                "partial_losses"):
        setattr(state, key, payload[key])
    state.saved_rng = payload["rng"] if state.step else None
    state.best_weights = best["model"] if best else cpu_copy(saved_state(tested_model(state)))


def restore_from_disk(state: FoldState, run_dir, identity: dict | None = None) -> bool:
    """Restore last.pt (and the best weights in best.pt) if there is one; False if not.

    With `identity`, a checkpoint of another config or other folds is refused. Files are read
    on the CPU: torch.set_rng_state needs CPU tensors, whatever device trains.
    """
    last = run_dir / "last.pt"
    if not last.is_file():
        return False
    payload = load_checkpoint(last)
    if identity is not None:
        refuse_if_foreign(last, identity, payload)
    if parameter_counts(payload["optimizer"]) != parameter_counts(state.optimizer.state_dict()):
        log.warning("%s holds the optimizer of another parameter layout (written before MMNet's encoders ran side "
                    "by side): this fold starts again; finished folds are kept", last)
        return False
    best = load_checkpoint(run_dir / "best.pt") if (run_dir / "best.pt").is_file() else None
    restore(state, payload, best)
    return True


def parameter_counts(optimizer_state: dict) -> list[int]:
    """Parameters per group of an optimizer's state dict: whether a saved one fits this model."""
    return [len(group["params"]) for group in optimizer_state["param_groups"]]


def reload_last(state: FoldState, run_dir, fresh_state) -> None:
    """Back to the state at the start of the epoch, keeping the new accumulation factor.

    Before the first checkpoint that is the initial state, which depends only on config, fold
    and seed: fresh_state() rebuilds it rather than every fold writing it to disk.
    """
    accumulation = state.accumulation
    if not restore_from_disk(state, run_dir):
        initial = fresh_state()
        for f in dataclasses.fields(state):  # every field: weights, optimizer, epoch, history, best
            setattr(state, f.name, getattr(initial, f.name))
    state.accumulation = accumulation


def refuse_if_foreign(path, identity: dict, saved: dict) -> None:
    if any(saved.get(key) != value for key, value in identity.items()):  # config, folds, stain reference
        raise ForeignRunError(f"{path} was written with a different config, folds or stain reference: rerun with "
                              f"--no-resume to retrain, or use another --output-dir")


def finished_results(run_dir, identity: dict, resume: bool) -> dict | None:
    """results.json of a finished fold with the same identity, or None to (re)train."""
    path = run_dir / "results.json"
    if not (resume and path.is_file()):
        return None
    results = json.loads(path.read_text())
    refuse_if_foreign(path, identity, results)
    return results


