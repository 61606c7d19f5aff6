"""The one training loop: train_one_epoch(), predict(), run_fold()."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from preprocess.augment import prepare_batch
from preprocess.dataset import ImageSource, PatientImages, fold_split
from utils.checkpoint import (FoldState, ForeignRunError, checkpoint_payload, config_json, cpu_copy,  # noqa: F401
                              finished_results, new_fold_state, reload_last, restore_from_disk)

log = logging.getLogger("mmnet")


class TrainingError(RuntimeError):
    """A fold cannot go on (non-finite loss, non-finite predictions)."""


@dataclass
class EpochResult:
    loss: float
    tuples: int
    seconds: float
    stopped_at: int | None = None  # steps done when a stop was requested mid-epoch
    losses: list | None = None  # per-step losses so far (kept for a mid-epoch resume)


def amp_context(device: str, amp_dtype: str):
    if amp_dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, amp_dtype))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; pretrained backbones learn at lr * backbone_lr_scale, new layers at lr."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if "backbone" in name else rest).append(param)
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": rest, "lr": cfg.lr}]
    fused = next(model.parameters()).is_cuda  # the fused kernel exists on CUDA only
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay,
                             fused=fused or None)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 1 % of the peak, stepped once per batch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _targets(data: PatientImages, owners: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.from_numpy(data.labels[owners]).to(device)
    return labels, torch.from_numpy(data.subtypes[owners]).to(device)


def train_one_epoch(model, source: ImageSource, data: PatientImages, tuples: np.ndarray,
                    owners: np.ndarray, optimizer, scheduler, scaler, loss_fn, batch_size: int,
                    amp_dtype: str, grad_clip: float, generator: torch.Generator,
                    epoch: int, start_step: int = 0, prior_losses=None, should_stop=None,
                    accumulation: int = 1) -> EpochResult:
    """One pass over `tuples` (already shuffled), from `start_step` on.

    Each step is one optimizer update over batch_size tuples, split into `accumulation`
    micro-batches (same effective batch, less memory). should_stop() is asked after every
    step. Raises TrainingError on a non-finite loss.
    """
    model.train()
    started, device = time.perf_counter(), source.device
    n_steps = math.ceil(len(tuples) / batch_size)
    losses = torch.zeros(n_steps, device=device)
    if prior_losses:
        losses[:len(prior_losses)] = torch.tensor(prior_losses, device=device)
    labels_all, subtypes_all = _targets(data, owners, device)
    micro = math.ceil(batch_size / accumulation)
    stopped_at = None
    for step in range(start_step, n_steps):
        optimizer.zero_grad(set_to_none=True)
        end = min(len(tuples), (step + 1) * batch_size)
        for start in range(step * batch_size, end, micro):
            stop = min(end, start + micro)
            images, mask = source.gather(tuples[start:stop])
            x = prepare_batch(images, model.norm_mean, model.norm_std, generator)
            with amp_context(device.type, amp_dtype):
                output = model(x, mask)
            loss, _ = loss_fn(output, labels_all[start:stop], subtypes_all[start:stop])
            scaler.scale(loss * (stop - start) / (end - step * batch_size)).backward()
            losses[step] += loss.detach() * (stop - start) / (end - step * batch_size)
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if should_stop is not None and should_stop() and step + 1 < n_steps:
            stopped_at = step + 1
            break
    values = losses[:stopped_at or n_steps].cpu().numpy()  # one sync per epoch, not per step
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise TrainingError(f"non-finite loss at epoch {epoch} step {int(bad[0])}: lower --lr "
                            f"or check the data; the last good checkpoint is kept")
    return EpochResult(float(values.mean()), len(tuples), time.perf_counter() - started,
                       stopped_at, values.tolist())


def predict(model, source: ImageSource, tuples: np.ndarray, batch_size: int,
            amp_dtype: str) -> dict[str, np.ndarray]:
    """Malignant probability, subtype probabilities and magnification weights per tuple.

    A CUDA out-of-memory halves the evaluation batch and starts over (prediction is stateless).
    """
    while True:
        try:
            return _predict_batches(model, source, tuples, batch_size, amp_dtype)
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
            batch_size //= 2
            log.warning("CUDA out of memory while predicting: retrying with batches of %d", batch_size)
            if source.device.type == "cuda":
                torch.cuda.empty_cache()


@torch.inference_mode()
def _predict_batches(model, source: ImageSource, tuples: np.ndarray, batch_size: int,
                     amp_dtype: str) -> dict[str, np.ndarray]:
    model.eval()
    probs, subtypes, weights = [], [], []
    for start in range(0, len(tuples), batch_size):
        images, mask = source.gather(tuples[start:start + batch_size])
        x = prepare_batch(images, model.norm_mean, model.norm_std, None)
        with amp_context(source.device.type, amp_dtype):
            output = model(x, mask)
        probs.append(torch.sigmoid(output.logits.float()))
        weights.append(output.mag_weights.float())
        if output.subtype_logits is not None:
            subtypes.append(torch.softmax(output.subtype_logits.float(), dim=-1))
    result = {"prob": torch.cat(probs).cpu().numpy(), "mag_weights": torch.cat(weights).cpu().numpy()}
    if subtypes:
        result["subtype_prob"] = torch.cat(subtypes).cpu().numpy()
    if not np.isfinite(result["prob"]).all():
        raise TrainingError("the model produced non-finite probabilities; not scoring them")
    return result


# ---------------------------------------------------------------- one fold
def _validate(state: FoldState, source, split, val_tuples, val_owners, batch: int, amp: str) -> dict:
    from sklearn.metrics import roc_auc_score

    out = predict(state.model, source, val_tuples, batch, amp)
    labels = split["val"].labels[val_owners]
    p = np.clip(out["prob"], 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return {"val_loss": loss, "val_auc": float(roc_auc_score(labels, out["prob"]))}


def _start_epoch(state: FoldState, cfg, env, split, fold: int, count: int):
    """Seeds, tuples and augmentation generator of the epoch; a mid-epoch resume re-applies the
    RNG states saved at the stop, so the rest of the epoch is what it would have been."""
    from preprocess.dataset import training_tuples
    from utils.helpers import derived_seed, seed_everything

    seed_everything(derived_seed(cfg.seed, fold, state.epoch))  # resumable: seeds depend on epoch only
    rng = np.random.default_rng(derived_seed(cfg.seed, fold, state.epoch, 1))
    gen = torch.Generator(device=env.device).manual_seed(derived_seed(cfg.seed, fold, state.epoch, 2))
    tuples, owners = training_tuples(split["train"], count, rng, cfg.class_balanced)
    if state.saved_rng:
        torch.set_rng_state(state.saved_rng["torch"])
        if "cuda" in state.saved_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.saved_rng["cuda"])
        gen.set_state(state.saved_rng["augment"])
        state.saved_rng = None
    return tuples, owners, gen


def _epoch_or_replay(state: FoldState, args: dict, env) -> EpochResult:
    """One epoch; a CUDA out-of-memory instead halves the micro-batch (gradient accumulation
    keeps the effective batch) and asks for the epoch to be replayed from its checkpoint."""
    try:
        return train_one_epoch(**args, accumulation=state.accumulation)
    except torch.OutOfMemoryError:
        if state.accumulation >= args["batch_size"]:
            raise
        state.accumulation *= 2
        log.warning("CUDA out of memory: retrying epoch %d with micro-batches of %d (x%d accumulation)",
                    state.epoch + 1, math.ceil(args["batch_size"] / state.accumulation), state.accumulation)
        if env.device == "cuda":
            torch.cuda.empty_cache()
        raise _ReplayEpoch from None


class _ReplayEpoch(Exception):
    """Restart the epoch from the last checkpoint (after an out-of-memory)."""


def _train_epochs(state, cfg, env, source, split, run_dir, identity, fold: int, writer, fresh_state) -> None:
    from preprocess.dataset import evaluation_tuples, tuples_per_epoch
    from utils.helpers import StopRequested, stop_requested
    from utils.losses import StudyLoss, subtype_class_weights

    loss_fn = StudyLoss(cfg, subtype_class_weights(split["train"].subtypes))
    val_tuples, val_owners = evaluation_tuples(split["val"])
    count = tuples_per_epoch(split["train"], cfg.tuples_per_epoch)
    while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
        epoch = state.epoch
        tuples, owners, gen = _start_epoch(state, cfg, env, split, fold, count)
        args = dict(model=state.model, source=source, data=split["train"], tuples=tuples, owners=owners,
                    optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
                    loss_fn=loss_fn, batch_size=env.batch_size, amp_dtype=env.amp_dtype,
                    grad_clip=cfg.grad_clip, generator=gen, epoch=epoch, start_step=state.step,
                    prior_losses=state.partial_losses, should_stop=stop_requested)
        try:
            result = _epoch_or_replay(state, args, env)
        except _ReplayEpoch:
            writer.wait()
            reload_last(state, run_dir, fresh_state)
            continue
        if result.stopped_at is not None:
            state.step, state.partial_losses = result.stopped_at, result.losses
            writer.submit([(checkpoint_payload(state, identity, gen), run_dir / "last.pt")])
            writer.wait()
            raise StopRequested(f"{run_dir.parent.name} fold {fold} epoch {epoch + 1} step {state.step}")
        state.step, state.partial_losses = 0, None
        val = _validate(state, source, split, val_tuples, val_owners, env.batch_size * 2, env.amp_dtype)
        improved = val["val_auc"] > state.best_auc + 1e-4 or (
            abs(val["val_auc"] - state.best_auc) <= 1e-4 and val["val_loss"] < state.best_loss)
        writes = []
        if improved:
            state.best_auc, state.best_loss, state.best_epoch, state.bad_epochs = \
                val["val_auc"], val["val_loss"], epoch, 0
            state.best_weights = cpu_copy(state.model.state_dict())
            writes.append(({"model": state.best_weights, "epoch": epoch, "config_json": config_json(cfg),
                            **identity}, run_dir / "best.pt"))
        else:
            state.bad_epochs += 1
        row = {"epoch": epoch, "train_loss": result.loss, **val, "lr": state.scheduler.get_last_lr()[-1],
               "tuples_per_s": result.tuples / result.seconds, "seconds": result.seconds, "best": improved}
        state.history.append(row)
        state.epoch = epoch + 1
        writer.submit([(checkpoint_payload(state, identity), run_dir / "last.pt"), *writes])
        log.info("%s fold %d epoch %d/%d | loss %.4f | val auc %.4f loss %.4f | %.0f tuples/s%s",
                 run_dir.parent.name, fold, epoch + 1, cfg.epochs, result.loss, val["val_auc"],
                 val["val_loss"], row["tuples_per_s"], " *" if improved else "")


def _test_predictions(state, cfg, env, source, split) -> tuple[object, float]:
    """Test-fold predictions (one row per tuple) and the threshold chosen on inner validation."""
    import pandas as pd

    from config import slot_labels
    from preprocess.dataset import evaluation_tuples
    from utils.metrics import choose_threshold

    rows = {}
    for role in ("val", "test"):
        data = split[role]
        tuples, owners = evaluation_tuples(data)
        out = predict(state.model, source, tuples, env.batch_size * 2, env.amp_dtype)
        frame = pd.DataFrame({"patient": np.array(data.patients)[owners], "group": np.array(data.groups)[owners],
                              "label": data.labels[owners], "subtype": data.subtypes[owners],
                              "prob": out["prob"]})
        for i in range(out.get("subtype_prob", np.zeros((0, 0))).shape[1]):
            frame[f"p_sub_{i}"] = out["subtype_prob"][:, i]
        for i, label in enumerate(slot_labels(cfg)):
            frame[f"w_{label.lower()}"] = out["mag_weights"][:, i]
        rows[role] = frame
    val_patients = rows["val"].groupby("patient").agg(label=("label", "first"), prob=("prob", "mean"))
    return rows["test"], choose_threshold(val_patients["label"], val_patients["prob"])


def run_fold(cfg, env, study, source, experiment: str, fold: int, usable, folds_hash: str) -> dict:
    """Train one experiment on one fold (or resume it, or return its finished results)."""
    import json
    from pathlib import Path

    import pandas as pd

    from preprocess.dataset import tuples_per_epoch
    from utils.helpers import BackgroundWriter, atomic_write_text, derived_seed
    from utils.metrics import fold_metrics

    run_dir = Path(cfg.output_dir) / "runs" / experiment / f"fold{fold}"
    identity = {"config_hash": cfg.training_hash(), "folds_hash": folds_hash}
    if (done := finished_results(run_dir, identity, cfg.resume)) is not None:
        log.info("%s fold %d: finished earlier, skipped (config %s)", experiment, fold, identity["config_hash"])
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    split = fold_split(study.index, usable, study.folds, fold, cfg)
    steps = math.ceil(tuples_per_epoch(split["train"], cfg.tuples_per_epoch) / env.batch_size)

    def fresh_state():
        return new_fold_state(cfg, env, steps, derived_seed(cfg.seed, fold))

    state = fresh_state()
    started = time.perf_counter()
    writer = BackgroundWriter()
    if cfg.resume and restore_from_disk(state, run_dir, identity):
        log.info("%s fold %d: resuming at epoch %d step %d", experiment, fold, state.epoch + 1, state.step)
    try:
        _train_epochs(state, cfg, env, source, split, run_dir, identity, fold, writer, fresh_state)
    finally:  # also on an interrupt: the last submitted checkpoint lands whole before we leave
        writer.wait()
    state.model.load_state_dict(state.best_weights)
    predictions, threshold = _test_predictions(state, cfg, env, source, split)
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    pd.DataFrame(state.history).to_csv(run_dir / "history.csv", index=False)
    weight_cols = [c for c in predictions.columns if c.startswith("w_")]
    results = {"experiment": experiment, "fold": fold, **identity, "threshold": threshold,
               "best_epoch": state.best_epoch, "epochs_run": state.epoch,
               "train_seconds": sum(h["seconds"] for h in state.history),
               "wall_seconds_this_run": time.perf_counter() - started,
               "pretrained": getattr(state.model, "pretrained_status", ""),
               "accumulation": state.accumulation,  # >1 after a CUDA out-of-memory
               "patients": {r: len(split[r]) for r in split},
               "magnification_weights": predictions[weight_cols].mean().to_dict(),
               "metrics": fold_metrics(predictions, threshold)}
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    # A finished fold is skipped on restart: only best.pt (the model) is needed from now on,
    # and last.pt (weights + optimizer, ~0.5 GB for four resnet18s) would fill a pod's disk.
    (run_dir / "last.pt").unlink(missing_ok=True)
    if cfg.keep_models == "mmnet" and experiment != "mmnet":
        (run_dir / "best.pt").unlink(missing_ok=True)
    m = results["metrics"]["patient"]
    log.info("%s fold %d done: patient acc %.3f bal-acc %.3f auc %.3f (threshold %.3f, best epoch %d)",
             experiment, fold, m["accuracy"], m["balanced_accuracy"], m["auc"], threshold, state.best_epoch + 1)
    return results
