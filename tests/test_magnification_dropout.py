"""Magnification dropout: training meets the incomplete tuples that test time asks about."""
import dataclasses

import numpy as np
import pytest

from config import Config, parse_args
from preprocess.dataset import drop_magnifications


def test_dropped_slots_are_masked_as_missing_ones_and_never_all():
    rng = np.random.default_rng(0)
    tuples = np.arange(40000).reshape(10000, 4)
    tuples[:100, 1:] = -1  # patients with one magnification only: it is never dropped
    out = drop_magnifications(tuples, 0.3, rng)
    kept = out >= 0
    assert ((out == tuples) | (out == -1)).all()  # a slot is kept as it was or masked (-1)
    assert kept.any(axis=1).all()  # never every present magnification of a tuple
    assert (out[:100, 0] == tuples[:100, 0]).all()
    # P(slot dropped | not all four dropped) = p (1 - p^3) / (1 - p^4) for p = 0.3: 0.2936
    assert (~kept[100:]).mean() == pytest.approx(0.3 * (1 - 0.3 ** 3) / (1 - 0.3 ** 4), abs=0.01)


def test_no_dropout_draws_nothing_and_single_slot_tuples_are_untouched():
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    tuples = np.arange(12).reshape(3, 4)
    assert drop_magnifications(tuples, 0.0, rng) is tuples
    assert rng.bit_generator.state == state  # the epoch's random stream is unchanged at p = 0
    single = np.arange(5).reshape(5, 1)
    assert drop_magnifications(single, 0.9, rng) is single


def test_the_option_is_validated_and_enters_the_run_identity():
    assert parse_args(["--magnification-dropout", "0.5"]).magnification_dropout == 0.5
    assert parse_args([]).training_hash() != parse_args(["--magnification-dropout", "0.5"]).training_hash()
    with pytest.raises(ValueError, match="magnification_dropout"):
        parse_args(["--magnification-dropout", "1.0"])


def _informative_cache(n_per_class: int, size: int, noise: float, seed: int):
    """uint8 frames for 4 magnification slots where each image is a noisy vote for its
    patient's label (its mean redness), so every magnification is informative and none is enough."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    shift = np.where(labels == 1, 18.0, -18.0)[:, None] + rng.normal(0, noise, (len(labels), 4))
    frames = rng.normal(128, 20, (len(labels), 4, size, size, 3))
    frames[..., 0] += shift[:, :, None, None]
    cache = frames.clip(0, 255).astype(np.uint8).reshape(-1, size, size, 3)
    return cache, np.arange(len(cache)).reshape(len(labels), 4), labels


def _trained_mmnet(p: float, steps: int = 120, size: int = 16, seed: int = 0):
    """MMNet trained on tuples with magnification dropout p, through the pipeline's own
    drop_magnifications, cache gather and batch preparation."""
    import torch

    from backbones import build_model
    from preprocess.dataset import ImageSource
    from utils.engine.batchnorm import settle_batchnorm

    torch.manual_seed(seed)
    cfg = Config(backbone="test_resnet", pretrained="off", image_size=size, feature_dim=16,
                 hierarchical_attention=False, subtype_head=False)
    model = build_model(cfg)
    cache, tuples, labels = _informative_cache(64, size, noise=15.0, seed=seed)
    source, rng = ImageSource(cache, "cpu"), np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(tuples), 32)
        x, mask = source.train_batch(drop_magnifications(tuples[rows], p, rng), model, generator, (0.0, 0.0))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x, mask).logits.squeeze(-1), torch.from_numpy(labels[rows]).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    settle_batchnorm(model, source=source, data=_patients(tuples, labels), cfg=dataclasses.replace(
        cfg, magnification_dropout=p), batch=32, amp_dtype="none", seed=seed)  # tested as it learned
    return model.eval(), source


def _patients(tuples: np.ndarray, labels: np.ndarray):
    """The training patients as the pipeline holds them: one image per magnification each."""
    from preprocess.dataset import PatientImages

    return PatientImages([f"p{i}" for i in range(len(labels))], labels, 4 * labels, [str(i) for i in range(len(labels))],
                         [[row[m:m + 1] for m in range(4)] for row in tuples])


def _accuracy(model, source, masked_slot=None) -> float:
    """Accuracy on fresh patients, optionally with one magnification masked as missing."""
    import torch

    cache, tuples, labels = _informative_cache(200, 16, noise=15.0, seed=1000)
    source.images = cache
    if masked_slot is not None:
        tuples = tuples.copy()
        tuples[:, masked_slot] = -1
    with torch.no_grad():
        x, mask = next(iter(source.views(tuples, model, False)))
        logits = model(x, mask).logits.squeeze(-1).numpy()
    return float(((logits > 0) == labels).mean())


def test_a_model_trained_with_dropout_loses_little_when_an_informative_magnification_is_masked():
    """Each magnification is a noisy vote (the Bayes accuracy is 0.992 with four and 0.981 with
    three): the default dropout's model keeps its accuracy when any one of them is missing."""
    model, source = _trained_mmnet(Config().magnification_dropout)
    full = _accuracy(model, source)
    masked = [_accuracy(model, source, slot) for slot in range(4)]
    assert full >= 0.93
    assert np.mean(masked) >= full - 0.04 and min(masked) >= full - 0.08, (full, masked)
