"""Focal loss for the binary head, class-weighted cross-entropy for the subtype head."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.5,
               gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss (Lin et al. 2017) on logits; alpha < 0 disables class weighting.

    gamma = 0 and alpha < 0 is exactly binary cross-entropy.
    """
    logits, targets = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_true) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def subtype_class_weights(subtypes: np.ndarray, draw_probability: np.ndarray | None = None,
                          n_classes: int = 8) -> torch.Tensor:
    """Weights that give every subtype present the same share of the expected subtype loss
    under the training sampler: w_k = 1 / (K * f_k), f_k = the probability that a drawn tuple
    is of subtype k (draw_probability per patient; uniform when None). The expected weight of
    a drawn tuple is then 1, so the loss keeps its scale. Absent subtypes get 0."""
    probs = np.full(len(subtypes), 1 / len(subtypes)) if draw_probability is None else np.asarray(draw_probability)
    freq = np.bincount(subtypes, weights=probs, minlength=n_classes)
    present = freq > 0
    weights = np.where(present, 1.0 / (present.sum() * np.where(present, freq, 1.0)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def binary_loss(cfg, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The binary part of the training loss (focal or plain BCE): also what validation reports,
    so the two curves measure the same quantity."""
    if cfg.loss == "focal":
        return focal_loss(logits, labels, cfg.focal_alpha, cfg.focal_gamma)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class StudyLoss:
    """Binary loss (focal or plain BCE) + subtype_loss_weight * weighted subtype cross-entropy,
    each normalised over the whole optimizer step, so that accumulating micro-batches gives
    the loss and gradient of the full batch (a weighted mean's denominator is the step's
    total weight, not each micro-batch's)."""

    def __init__(self, cfg, subtype_weights: torch.Tensor | None):
        self.cfg = cfg
        self.subtype_weights = subtype_weights
        self._on_device = {}  # the weights once per device: no host copy in a step

    def _weights(self, device: torch.device) -> torch.Tensor | None:
        if self.subtype_weights is None:
            return None
        if device not in self._on_device:
            self._on_device[device] = self.subtype_weights.to(device)
        return self._on_device[device]

    def step_totals(self, labels: torch.Tensor, subtypes: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The denominators of one optimizer step: its sample count and subtype weight total."""
        weights = self._weights(subtypes.device)
        if weights is None:  # a fill on the device, not a host tensor copied each step
            return len(labels), torch.full((), float(len(subtypes)), device=subtypes.device)
        return len(labels), weights[subtypes].sum()

    def __call__(self, output, labels: torch.Tensor, subtypes: torch.Tensor, step=None) -> tuple[torch.Tensor, dict]:
        """A micro-batch's share of its step's loss; `step` = step_totals() of the whole step
        (None: the micro-batch is the step)."""
        rows, weight_total = step if step is not None else self.step_totals(labels, subtypes)
        binary = binary_loss(self.cfg, output.logits, labels) * (len(labels) / rows)
        total, parts = binary, {"binary": binary.detach()}
        if output.subtype_logits is not None and self.cfg.subtype_loss_weight > 0:
            subtype = F.cross_entropy(output.subtype_logits.float(), subtypes, weight=self._weights(subtypes.device),
                                      reduction="sum") / weight_total
            total = total + self.cfg.subtype_loss_weight * subtype
            parts["subtype"] = subtype.detach()
        return total, parts
