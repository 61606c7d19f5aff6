"""A model is tested as it learned: BatchNorm running statistics re-estimated on what training fed
the network, before anything is predicted, chosen or kept.

Short training (a dry run, a small dataset, a moving average of the weights) leaves the running
statistics far from the batch statistics the weights were trained with: with momentum 0.1, eight
steps keep 43 % of the initial values. Settling runs one no-grad pass in training mode over the
fold's training tuples as training draws them (class-balanced patients, magnification dropout,
fixed seed, patients mixed in every batch, training's micro-batch), stain-normalised in float32
outside autocast, and sets each layer's running mean and variance to the exact mean and unbiased
variance of every input it saw. torch's `update_bn` averages per-batch variances instead (it
loses the variance between batches) and reads `num_batches_tracked` on the host per layer and
batch; the sums here stay on the device.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from backbones.encoder import frozen_encoder
from preprocess.dataset import PatientImages, training_samples, tuples_per_epoch
from utils.device import empty_cache, is_out_of_memory
from utils.engine.train import amp_context


def trained_batchnorms(model: torch.nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that trained with the model (a frozen encoder's did not)."""
    encoder = frozen_encoder(model)
    frozen = {id(m) for m in encoder.modules()} if encoder is not None else set()
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in frozen
            and m.track_running_stats]


def has_batchnorm(model: torch.nn.Module) -> bool:
    return bool(trained_batchnorms(model))


class InputMoments:
    """Exact running mean and M2 (sum of squared deviations) per channel of every input a layer
    sees, merged batch by batch with Chan et al.'s pairwise update: float32 on the device, the
    element count on the host (from shapes), so no value is read back."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def __call__(self, module, inputs) -> None:
        x = inputs[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        mean = x.mean(dims)
        m2 = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def store(self, layer: _BatchNorm) -> None:
        """The layer's running statistics := the mean and unbiased variance seen (as BatchNorm
        keeps them)."""
        layer.running_mean.copy_(self.mean)
        layer.running_var.copy_(self.m2 / max(1, self.count - 1))


def settling_samples(data: PatientImages, cfg, seed: int) -> np.ndarray:
    """One epoch of training tuples (or bags) drawn as training draws them, with their
    magnification-dropout masks, from a fixed seed: patients are mixed within every batch."""
    rng = np.random.default_rng(seed)
    samples, _ = training_samples(data, tuples_per_epoch(data, cfg), rng, cfg)
    return samples


def settle_batchnorm(model: torch.nn.Module, *, source, data: PatientImages, cfg, batch: int,
                     amp_dtype: str, seed: int) -> bool:
    """Running statistics of every trained BatchNorm layer recomputed on `data` (the fold's
    training patients): settling_samples(data, cfg, seed) in batches of `batch` (training's
    micro-batch). False where the model has none."""
    if not has_batchnorm(model) or not len(data):
        return False
    samples = settling_samples(data, cfg, seed)
    devices = [source.device.index or 0] if source.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the dropout of this pass leaves no trace
        torch.manual_seed(seed)
        while True:  # out of memory: the same back-off as training, the sums started afresh
            try:
                return _settle_pass(model, source, samples, batch, amp_dtype)
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or batch == 1:
                    raise
                empty_cache(source.device.type)
                batch = max(1, batch // 2)


@torch.no_grad()
def _settle_pass(model, source, samples: np.ndarray, batch: int, amp_dtype: str) -> bool:
    layers = trained_batchnorms(model)
    moments = [InputMoments() for _ in layers]
    handles = [layer.register_forward_pre_hook(m) for layer, m in zip(layers, moments)]
    tracked = [layer.num_batches_tracked.clone() for layer in layers if layer.num_batches_tracked is not None]
    mode, encoder = model.training, frozen_encoder(model)
    model.train()
    if encoder is not None:
        encoder.eval()  # a frozen encoder normalises with its own statistics, as it always does
    try:
        rows = source.upload(samples)  # one non-blocking copy of every index, as predict() makes
        for start in range(0, len(samples), batch):
            _settle_batch(model, source, rows[start:start + batch], amp_dtype)
        for layer, m in zip(layers, moments):
            m.store(layer)
        for layer, count in zip([layer for layer in layers if layer.num_batches_tracked is not None], tracked):
            layer.num_batches_tracked.copy_(count)
    finally:
        for handle in handles:
            handle.remove()
        model.train(mode)
    return True


def _settle_batch(model, source, rows, amp_dtype: str) -> None:
    """One batch through the network; the hooks take its BatchNorm inputs. The plain view is
    built here, in float32: the stain normaliser never runs under autocast."""
    x, mask = next(iter(source.views(rows, model, False)))
    with amp_context(source.device.type, amp_dtype):
        model(x, mask)
