"""The one training loop: a fold's model, optimizer and schedule, train_one_epoch(), predict()."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from backbones import build_model
from preprocess.dataset import ImageSource, PatientImages, reads_levels, samples_for
from preprocess.image_source import TTA_FLIPS, evaluation_views
from utils.device import empty_cache, grad_scaler, is_out_of_memory, seed_everything
from utils.engine.averaging import moving_average, update_average
from utils.engine.checkpoint import FoldState
from utils.engine.gradients import GradientSum
from utils.engine.graphs import GraphedStep, new_recorder, recorded_forward
from utils.engine.optimizer import make_optimizer, make_scheduler

log = logging.getLogger("mmnet")


class TrainingError(RuntimeError):
    """A fold cannot go on (non-finite loss, non-finite predictions)."""


@dataclass
class EpochResult:
    loss: float  # mean total training loss
    tuples: int
    seconds: float
    stopped_at: int | None = None  # steps done when a stop was requested mid-epoch
    losses: list | None = None  # per-step [total, binary, subtype] so far (kept for a mid-epoch resume)
    parts: dict | None = None  # train_binary_loss, train_subtype_loss: the epoch means


@dataclass
class LoopSettings:
    """What stays the same for every epoch of a fold."""
    source: ImageSource  # the decoded images, where the model runs
    data: PatientImages  # the training patients
    loss_fn: Callable  # StudyLoss: (output, labels, subtypes, step) -> (a micro-batch's share of the step's loss, parts)
    batch_size: int  # tuples per optimizer step
    amp_dtype: str  # bfloat16 | float16 | none
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    jitter: tuple = (0.1, 0.1)  # colour and stain jitter strengths of the augmentation
    should_stop: Callable | None = None  # asked after every step; truthy = save and stop
    quarter_turns: bool = False  # also 90-degree turns (a transposed batch) in training
    graphs: bool = False  # --cuda-graphs on and possible here (utils.engine.graphs.graph_blocker)


@dataclass
class EpochPlan:
    """What one epoch draws: its tuples (already shuffled) and its augmentation stream."""
    tuples: np.ndarray  # (T, M) cache rows
    owners: np.ndarray  # (T,) patient position of each tuple
    generator: torch.Generator  # augmentation randomness
    epoch: int
    start_step: int = 0  # >0 when resuming an epoch that was stopped mid-way
    prior_losses: list | None = None  # [total, binary, subtype] of the steps done before the stop


def amp_context(device: str, amp_dtype: str, cache: bool = True):
    """Autocast at amp_dtype ('none': off); no cast cache where recorded (stale copies, pytorch#71631)."""
    if amp_dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, amp_dtype), cache_enabled=cache)


def new_fold_state(cfg, env, steps_per_epoch: int, seed: int, stain: dict | None = None) -> FoldState:
    """A fold's model, optimizer, schedule and scaler, from the config and the seed alone, and
    the fold's stain reference (preprocess.stain.fold_reference) when there is one."""
    seed_everything(seed)  # same init for every experiment of this fold
    model = build_model(cfg)
    if stain is not None:
        model.stain.load_state_dict(stain)
    model = model.to(env.device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, steps_per_epoch * cfg.epochs,
                               int(cfg.warmup_epochs * steps_per_epoch))
    scaler = grad_scaler(env.device, enabled=env.amp_dtype == "float16")
    return FoldState(model, optimizer, scheduler, scaler, history=[],
                     accumulation=math.ceil(samples_for(cfg, env.batch_size) / samples_for(cfg, env.micro_batch)),
                     average=moving_average(model, cfg.ema_epochs, steps_per_epoch))


def _step(state: FoldState, loop: LoopSettings, plan: EpochPlan, targets, bounds: tuple) -> torch.Tensor:
    """One optimizer update over tuples [start, end), in state.accumulation micro-batches (or the
    recorded update of --cuda-graphs), then the schedule and the moving average.
    Returns [total, binary, subtype] loss of the step, on the device (no sync)."""
    start_row, end = bounds
    labels_all, subtypes_all = targets
    batches = _micro_batches(state, loop, plan, targets, bounds)
    if _graphed(state, loop) is not None:
        total = state.graphed(*next(batches))
    else:
        total = _update(state, loop, batches, labels_all[start_row:end], subtypes_all[start_row:end])
    state.scheduler.step()
    if state.average is not None:
        update_average(state.average, state.model)
    return total


def _micro_batches(state: FoldState, loop: LoopSettings, plan: EpochPlan, targets, bounds: tuple):
    """(x, mask, labels, subtypes) of each micro-batch of the step, made one at a time (the
    accumulation exists to bound memory)."""
    start_row, end = bounds
    micro = math.ceil(loop.batch_size / state.accumulation)
    for start in range(start_row, end, micro):
        rows = slice(start, min(end, start + micro))
        x, mask = loop.source.train_batch(plan.tuples[rows], state.model, plan.generator, loop.jitter, loop.quarter_turns)
        yield x, mask, targets[0][rows], targets[1][rows]


def _update(state: FoldState, loop: LoopSettings, batches, step_labels, step_subtypes) -> torch.Tensor:
    """Gradients of the step's micro-batches (x, mask, labels, subtypes), clipped, and the
    optimizer's update: what --cuda-graphs records. Returns [total, binary, subtype] loss."""
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(3, device=loop.source.device)
    step = loop.loss_fn.step_totals(step_labels, step_subtypes)
    gradients = GradientSum(state.model.parameters())  # backward()'s gradients, fewer operators
    for x, mask, labels, subtypes in batches:
        with amp_context(loop.source.device.type, loop.amp_dtype, cache=not loop.graphs):
            output = state.model(x, mask)
        loss, parts = loop.loss_fn(output, labels, subtypes, step)  # its share
        gradients.add(state.scaler.scale(loss))
        zero = torch.zeros((), device=total.device)
        total += torch.stack([loss.detach(), parts.get("binary", loss.detach()), parts.get("subtype", zero)])
    gradients.store()
    if loop.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), loop.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return total


def _graphed(state: FoldState, loop: LoopSettings):
    """The fold's recorded update when the loop asks for graphs and a step is one micro-batch
    (an out-of-memory back-off to accumulation drops it); made on first use."""
    if not loop.graphs or state.accumulation > 1:
        state.graphed = None
    elif state.graphed is None or state.graphed.loop is not loop:
        state.graphed = recorded_update(state, loop, new_recorder(loop.source.device.type))
    return state.graphed


def recorded_update(state: FoldState, loop: LoopSettings, recorder) -> GraphedStep:
    """_update() of one micro-batch (x, mask, labels, subtypes) as a GraphedStep."""
    graphed = GraphedStep(lambda x, mask, labels, subtypes: _update(state, loop, [(x, mask, labels, subtypes)],
                                                                    labels, subtypes), state.optimizer, recorder)
    graphed.loop = loop
    return graphed


def train_one_epoch(state: FoldState, loop: LoopSettings, plan: EpochPlan) -> EpochResult:
    """One pass over plan.tuples from plan.start_step on; each step is one optimizer update over
    loop.batch_size tuples. loop.should_stop() is asked after every step. Raises TrainingError
    on a non-finite loss."""
    state.model.train()
    started, device = time.perf_counter(), loop.source.device
    n_steps = math.ceil(len(plan.tuples) / loop.batch_size)
    losses = torch.zeros(n_steps, 3, device=device)
    if plan.prior_losses:
        losses[:len(plan.prior_losses)] = torch.tensor(plan.prior_losses, device=device)
    targets = (torch.from_numpy(loop.data.labels[plan.owners]).to(device),
               torch.from_numpy(loop.data.subtypes[plan.owners]).to(device))
    # The epoch's tuples go to the device once (with a device-resident cache): no step copies
    # anything from the host.
    plan = dataclasses.replace(plan, tuples=loop.source.upload(plan.tuples))
    stopped_at = None
    for step in range(plan.start_step, n_steps):
        bounds = (step * loop.batch_size, min(len(plan.tuples), (step + 1) * loop.batch_size))
        losses[step] += _step(state, loop, plan, targets, bounds)
        if loop.should_stop is not None and loop.should_stop() and step + 1 < n_steps:
            stopped_at = step + 1
            break
    values = losses[:stopped_at or n_steps].cpu().numpy()  # one sync per epoch, not per step
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise TrainingError(f"non-finite loss at epoch {plan.epoch} step {int(bad[0])}: lower --lr "
                            f"or check the data; the last good checkpoint is kept")
    means = values.mean(axis=0)
    return EpochResult(float(means[0]), len(plan.tuples), time.perf_counter() - started, stopped_at,
                       values.tolist(), {"train_binary_loss": float(means[1]), "train_subtype_loss": float(means[2])})


def predict(model, source: ImageSource, tuples: np.ndarray, batch_size: int,
            amp_dtype: str, tta: bool = True, static: bool | None = None, graphs: bool = False) -> dict[str, np.ndarray]:
    """Malignant probability, subtype probabilities and magnification weights per tuple, each
    the mean over the test-time views (tta) or of the plain view. static (default: on CUDA):
    the last batch padded to the batch size with copies of the first tuple (their outputs
    dropped), so every batch has one shape and cuDNN tunes once per study, not once per set.
    graphs (utils.engine.graphs.evaluation_graphs): the forward recorded and replayed (static).
    A CUDA out-of-memory halves the evaluation batch and starts over (prediction is stateless).
    """
    static = graphs or (source.device.type == "cuda" if static is None else static)
    while True:
        try:
            return _predict_batches(model, source, padded(tuples, batch_size) if static else tuples, batch_size,
                                    (amp_dtype, tta, graphs), len(tuples))
        except RuntimeError as exc:  # torch.OutOfMemoryError is one; is_out_of_memory() tells the rest apart
            if batch_size <= 1 or not is_out_of_memory(exc):
                raise
            batch_size //= 2
            log.warning("out of memory while predicting: retrying with batches of %d", batch_size)
            empty_cache(source.device.type)


def _forward(model, x: torch.Tensor, mask: torch.Tensor, amp_dtype: str, cache: bool = True):
    with amp_context(x.device.type, amp_dtype, cache):
        return model(x, mask)


def views_forward(model, images: torch.Tensor, mask: torch.Tensor, evaluation: tuple[str, bool, bool], cache=True):
    """The model's output over every test-time view of gathered frames (evaluation: amp dtype,
    tta, stain-normalise) in one forward (what ImageSource.views gives, stacked): the views are
    mirror images of one shape, and rows are independent in evaluation."""
    amp_dtype, tta, stain = evaluation
    inputs, masks = zip(*evaluation_views(images, mask, model, tta, stain))
    return _forward(model, torch.cat(inputs), torch.cat(masks), amp_dtype, cache)


@torch.inference_mode()
def predict_samples(model, source, samples, evaluation: tuple[str, bool, bool]) -> dict:
    """view_means() of the test-time views of source's samples (host rows or uploaded ones);
    evaluation: amp dtype, tta, graphs. With graphs and an image source the views (stain
    normalisation of raw frames, mirror images) and the forward are recorded as one, per model,
    shapes and evaluation; cached encoder maps (FeatureSource) are views already: eager."""
    amp_dtype, tta, graphs = evaluation
    if not (graphs and isinstance(source, ImageSource)):
        inputs, masks = zip(*source.views(samples, model, tta))
        return view_means(_forward(model, torch.cat(inputs), torch.cat(masks), amp_dtype), tta)
    images, mask = source.gather(samples, reads_levels(model))
    views = (amp_dtype, tta, not source.stain_applied)
    output = recorded_forward(model, lambda net, *xs: views_forward(net, *xs, views, cache=False), (images, mask),
                              variant=views)
    return view_means(output, tta)


def view_means(output, tta: bool) -> dict:
    """Mean over the stacked test-time views (tta) or the plain one of sigmoid, softmax,
    magnification and image weights (those the model gives): probabilities are averaged, not
    logits, so a view that is very sure cannot outvote the others. 'prob_plain' is the plain view's."""
    count = len(TTA_FLIPS) if tta else 1
    parts = {"prob": torch.sigmoid(output.logits.float())}
    for key, value in (("mag_weights", output.mag_weights), ("instance_weights", output.instance_weights),
                       ("hierarchy_weights", output.hierarchy_weights)):
        if value is not None:
            parts[key] = value.float()
    if output.subtype_logits is not None:
        parts["subtype_prob"] = torch.softmax(output.subtype_logits.float(), dim=-1)
    by_view = {key: value.reshape(count, -1, *value.shape[1:]) for key, value in parts.items()}
    return {**{key: value.mean(dim=0) for key, value in by_view.items()}, "prob_plain": by_view["prob"][0]}


def filled(samples: np.ndarray, model) -> np.ndarray:
    """A batch of bags without the empty slots every bag of it has: bags are filled from the
    left and padded to the widest patient of the split, and a patient of 20 images should not
    carry 400 black frames through augmentation. Tuples keep their slots (one per magnification)."""
    if not reads_levels(model) or not (samples >= 0).any():
        return samples
    return samples[:, :int(np.flatnonzero((samples >= 0).any(axis=0))[-1]) + 1]


def _predict_batch(model, source, samples, evaluation: tuple[str, bool, bool], slots: int) -> dict:
    """One batch's predict_samples() on its (uploaded, filled) samples; per-image weights padded
    back to the split's `slots`."""
    out = predict_samples(model, source, samples, evaluation)
    if "instance_weights" in out and out["instance_weights"].shape[1] < slots:
        out["instance_weights"] = torch.nn.functional.pad(
            out["instance_weights"], (0, slots - out["instance_weights"].shape[1]))
    return out


def padded(tuples: np.ndarray, batch_size: int) -> np.ndarray:
    """The tuples and copies of the first one up to a whole number of batches."""
    return np.concatenate([tuples, np.repeat(tuples[:1], -len(tuples) % batch_size, axis=0)])


def _predict_batches(model, source, tuples: np.ndarray, batch_size: int,
                     evaluation: tuple[str, bool, bool], tuples_kept: int) -> dict[str, np.ndarray]:
    model.eval()
    rows = source.upload(tuples)  # one copy of all indices; each batch's width is read on the host
    batches = []
    for start in range(0, len(tuples), batch_size):
        width = filled(tuples[start:start + batch_size], model).shape[1]
        batches.append(_predict_batch(model, source, rows[start:start + batch_size, :width], evaluation, tuples.shape[1]))
    # Rows past `tuples_kept` are a padded batch's copies (static shapes): dropped.
    result = {key: torch.cat([b[key] for b in batches])[:tuples_kept].cpu().numpy() for key in batches[0]}
    if not np.isfinite(result["prob"]).all():
        raise TrainingError("the model produced non-finite probabilities; not scoring them")
    return result
