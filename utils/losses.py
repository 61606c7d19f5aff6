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


def subtype_class_weights(subtypes: np.ndarray, n_classes: int = 8) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the classes present); absent classes get 0."""
    counts = np.bincount(subtypes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


class StudyLoss:
    """Binary loss (focal or plain BCE) + subtype_loss_weight * weighted subtype cross-entropy."""

    def __init__(self, cfg, subtype_weights: torch.Tensor | None):
        self.cfg = cfg
        self.subtype_weights = subtype_weights

    def __call__(self, output, labels: torch.Tensor, subtypes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.cfg.loss == "focal":
            binary = focal_loss(output.logits, labels, self.cfg.focal_alpha, self.cfg.focal_gamma)
        else:
            binary = F.binary_cross_entropy_with_logits(output.logits.float(), labels.float())
        total, parts = binary, {"binary": binary.detach()}
        if output.subtype_logits is not None and self.cfg.subtype_loss_weight > 0:
            weights = self.subtype_weights.to(output.logits.device) if self.subtype_weights is not None else None
            subtype = F.cross_entropy(output.subtype_logits.float(), subtypes, weight=weights)
            total = total + self.cfg.subtype_loss_weight * subtype
            parts["subtype"] = subtype.detach()
        return total, parts
