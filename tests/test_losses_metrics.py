"""Focal loss against independent implementations; metrics on hand-made cases."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from utils.engine.losses import focal_loss, subtype_class_weights
from utils.metrics import binary_metrics, choose_threshold, fold_metrics, patient_probabilities


@pytest.fixture
def logits_targets():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(257, generator=gen) * 3, (torch.rand(257, generator=gen) > 0.4).float()


def test_gamma_zero_without_alpha_is_cross_entropy(logits_targets):
    logits, targets = logits_targets
    assert torch.allclose(focal_loss(logits, targets, alpha=-1, gamma=0),
                          F.binary_cross_entropy_with_logits(logits, targets), atol=1e-7)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.0), (-1, 2.0), (0.75, 0.5)])
def test_focal_matches_torchvision(logits_targets, alpha, gamma):
    logits, targets = logits_targets
    ours = focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    reference = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
    assert abs(ours.item() - reference.item()) < 1e-6


def test_focal_downweights_easy_examples():
    easy = focal_loss(torch.tensor([6.0]), torch.tensor([1.0]), alpha=-1, gamma=2)
    hard = focal_loss(torch.tensor([-1.0]), torch.tensor([1.0]), alpha=-1, gamma=2)
    bce_ratio = F.softplus(torch.tensor(-6.0)) / F.softplus(torch.tensor(1.0))
    assert easy / hard < bce_ratio  # focusing shrinks the easy one much more than BCE does


def test_subtype_weights_are_inverse_frequency():
    weights = subtype_class_weights(np.array([0, 0, 0, 4, 7, 7]))
    assert weights[0] * 3 == pytest.approx(weights[4] * 1) and weights[7] * 2 == pytest.approx(weights[4])
    assert weights[1] == 0 and float((weights[[0, 4, 7]] * torch.tensor([3, 1, 2]) / 6).sum()) == pytest.approx(1.0)


def test_subtype_weights_equalise_the_loss_under_the_class_balanced_sampler():
    """Benign patients are drawn far more often per patient than malignant ones; the weights
    come from the sampler's draw probabilities, so each subtype gets the same loss share."""
    from preprocess.dataset import PatientImages, sampling_weights

    subtypes = np.array([0, 1, 4, 4, 4, 4, 4, 6])  # 2 benign (A, F), 6 malignant (5 DC, 1 MC)
    labels = (subtypes >= 4).astype(int)
    rows = [[np.arange(n)] for n in (10, 30, 20, 20, 20, 20, 20, 40)]
    data = PatientImages([str(i) for i in range(8)], labels, subtypes, [str(i) for i in range(8)], rows)
    draw = sampling_weights(data, class_balanced=True)
    assert draw[labels == 0].sum() == pytest.approx(0.5)
    weights = subtype_class_weights(subtypes, draw)
    share = np.bincount(subtypes, weights=draw, minlength=8) * weights.numpy()
    assert np.allclose(share[[0, 1, 4, 6]], 0.25) and share[[2, 3, 5, 7]].sum() == 0


def test_binary_metrics_hand_case():
    m = binary_metrics([1, 1, 1, 0, 0], [0.9, 0.8, 0.3, 0.2, 0.6], threshold=0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6)


def test_single_class_auc_is_undefined_and_nan_probs_refused():
    assert math.isnan(binary_metrics([1, 1], [0.2, 0.9])["auc"])
    with pytest.raises(ValueError):
        binary_metrics([1, 0], [float("nan"), 0.1])


def test_patient_aggregation_is_mean_over_tuples():
    preds = pd.DataFrame({"patient": ["a", "a", "a", "b", "b"], "group": ["1"] * 3 + ["2"] * 2,
                          "label": [1, 1, 1, 0, 0], "subtype": [4, 4, 4, 0, 0],
                          "prob": [0.9, 0.6, 0.3, 0.2, 0.6]})
    patients = patient_probabilities(preds).set_index("patient")
    assert patients.loc["a", "prob"] == pytest.approx(0.6) and patients.loc["b", "prob"] == pytest.approx(0.4)
    assert patients.loc["a", "n_tuples"] == 3
    metrics = fold_metrics(preds, threshold=0.5)
    assert metrics["patient"]["accuracy"] == 1.0 and metrics["tuple"]["accuracy"] == pytest.approx(3 / 5)


def test_threshold_separates_separable_validation():
    t = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.9])
    assert 0.3 < t < 0.35
    assert choose_threshold([1, 1], [0.2, 0.4]) == 0.5


def test_pooled_predictions_keep_real_fold_numbers_and_thresholds():
    from utils.metrics import pooled_out_of_fold

    frame = pd.DataFrame({"patient": ["a"], "label": [1], "prob": [0.7]})
    pooled = pooled_out_of_fold([frame, frame], [{"fold": 0, "threshold": 0.4}, {"fold": 2, "threshold": 0.6}])
    assert pooled["fold"].tolist() == [0, 2]  # fold 1 failed: its number is not reused
    assert pooled["threshold"].tolist() == [0.4, 0.6]
