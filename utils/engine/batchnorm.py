"""A model is tested as it learned: BatchNorm running statistics re-estimated on the fold's
training patients before anything is predicted or saved.

Short training (a dry run, a small dataset, a moving average of the weights) leaves the running
statistics far from the batch statistics the weights were trained with: with momentum 0.1, eight
steps keep 43 % of the initial values. torch's own `update_bn` recomputes them as an exact
average (momentum None) over one no-grad pass; this module feeds it the fold's plain views.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from backbones.encoder import frozen_encoder
from preprocess.dataset import PatientImages, evaluation_samples
from utils.device import empty_cache, is_out_of_memory
from utils.engine.train import amp_context, filled


class _TwoInputs(torch.nn.Module):
    """update_bn calls model(batch) with one argument; MMNet takes (images, mask)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pair):
        return self.model(*pair)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether any BatchNorm layer trained (a frozen encoder's do not)."""
    encoder = frozen_encoder(model)
    frozen = {id(m) for m in encoder.modules()} if encoder is not None else set()
    return any(isinstance(m, _BatchNorm) and id(m) not in frozen for m in model.modules())


def _plain_views(model, source, samples: np.ndarray, batch: int):
    """[(images, mask)] per batch: the plain view only (no flips), as the model is tested,
    without the empty columns of a batch of bags (no black frame enters the statistics)."""
    for start in range(0, len(samples), batch):
        yield [next(iter(source.views(filled(samples[start:start + batch], model), model, False)))]


def settle_batchnorm(model: torch.nn.Module, *, source, data: PatientImages, cfg, batch: int,
                     amp_dtype: str) -> bool:
    """Running statistics of every BatchNorm layer recomputed on `data` (the fold's training
    patients, deterministic samples covering every image). False where the model has none."""
    if not has_batchnorm(model) or not len(data):
        return False
    samples, _ = evaluation_samples(data, cfg)
    # A frozen encoder keeps its statistics: it is not what trained, and with cached maps
    # (--freeze-backbone) it never runs here, so update_bn would leave it reset.
    encoder = frozen_encoder(model)
    kept = [(b, b.clone()) for b in encoder.buffers()] if encoder is not None else []
    try:
        return _update(model, source, samples, batch, amp_dtype)
    finally:
        for buffer, value in kept:
            buffer.copy_(value)


def _update(model, source, samples: np.ndarray, batch: int, amp_dtype: str) -> bool:
    while True:  # update_bn resets the statistics first, so a retry starts clean
        try:
            with amp_context(source.device.type, amp_dtype):
                # The wrapper starts in the model's own mode: update_bn puts back the mode it finds.
                update_bn(_plain_views(model, source, samples, batch), _TwoInputs(model).train(model.training))
            return True
        except RuntimeError as exc:  # out of memory: the same back-off as training, on a no-grad pass
            if not is_out_of_memory(exc) or batch == 1:
                raise
            empty_cache(source.device.type)
            batch = max(1, batch // 2)
