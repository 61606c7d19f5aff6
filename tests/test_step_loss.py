"""The loss of an optimizer step does not depend on how it is cut into micro-batches."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from config import Config
from utils.engine.losses import StudyLoss


def _step_loss(loss_fn, logits, sub_logits, labels, subtypes, pieces: int):
    """Sum of the micro-batch shares, as train._step accumulates them."""
    step = loss_fn.step_totals(labels, subtypes)
    total = torch.zeros(())
    for idx in torch.arange(len(labels)).chunk(pieces):
        out = SimpleNamespace(logits=logits[idx], subtype_logits=sub_logits[idx])
        total = total + loss_fn(out, labels[idx], subtypes[idx], step)[0]
    return total


def test_weighted_subtype_loss_is_normalised_over_the_whole_step():
    """Weights 4, 4, 0.5, 0.5 on four samples: the step's loss is sum(w l) / sum(w) whether the
    step is one batch, two or four micro-batches (per-micro-batch means gave 2.750 for 1.778)."""
    cfg = Config(subtype_loss_weight=1.0, loss="ce")
    weights = torch.tensor([4.0, 4.0, 0.5, 0.5, 1, 1, 1, 1])
    loss_fn = StudyLoss(cfg, weights)
    torch.manual_seed(0)
    base_logits, base_sub = torch.randn(4), torch.randn(4, 8)
    labels, subtypes = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3])
    per_sample = F.cross_entropy(base_sub, subtypes, reduction="none")
    oracle = F.binary_cross_entropy_with_logits(base_logits, labels.float()) + \
        (weights[subtypes] * per_sample).sum() / weights[subtypes].sum()
    results = []
    for pieces in (1, 2, 4):
        logits, sub = base_logits.clone().requires_grad_(), base_sub.clone().requires_grad_()
        loss = _step_loss(loss_fn, logits, sub, labels, subtypes, pieces)
        loss.backward()
        results.append((loss.detach(), logits.grad, sub.grad))
    assert results[0][0] == pytest.approx(float(oracle), rel=1e-6)
    for loss, logit_grad, sub_grad in results[1:]:
        assert loss == pytest.approx(float(results[0][0]), rel=1e-6)
        torch.testing.assert_close(logit_grad, results[0][1])
        torch.testing.assert_close(sub_grad, results[0][2])
