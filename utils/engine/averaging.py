"""The moving average of a fold's weights (--ema-epochs): torch's AveragedModel with its EMA
function, updated after every step without reading the device."""
from __future__ import annotations

import itertools

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def moving_average(model: torch.nn.Module, ema_epochs: float, steps_per_epoch: int):
    """torch's AveragedModel as an exponential moving average updated after every step, whose
    horizon (1 / (1 - decay) steps) is ema_epochs epochs; BatchNorm statistics are averaged
    with the weights. None when ema_epochs is 0."""
    if ema_epochs <= 0:
        return None
    decay = 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    average.decay = decay
    return average


def update_average(average: AveragedModel, model: torch.nn.Module) -> None:
    """AveragedModel.update_parameters with its EMA function, without its host read: torch's
    version asks `n_averaged == 0` on every step (a device sync) to copy the first weights;
    here the host remembers whether the average has started (restored with a checkpoint)."""
    pairs = [(mine, theirs) for mine, theirs in zip(
        itertools.chain(average.module.parameters(), average.module.buffers()),
        itertools.chain(model.parameters(), model.buffers())) if mine is not theirs]  # a frozen encoder is shared
    floats = [(mine.detach(), theirs.detach()) for mine, theirs in pairs if mine.is_floating_point()]
    weight = 1.0 - average.decay if getattr(average, "started", False) else 1.0  # the first update copies
    torch._foreach_lerp_([mine for mine, _ in floats], [theirs for _, theirs in floats], weight)
    average.started = True
    for mine, theirs in pairs:
        if not mine.is_floating_point():  # BatchNorm's num_batches_tracked, averaged as torch does
            mine.detach().copy_(mine * (1.0 - weight) + theirs.detach() * weight)
    average.n_averaged += 1
