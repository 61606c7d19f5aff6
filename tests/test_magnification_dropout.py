"""Magnification dropout: training meets the incomplete tuples that test time asks about."""
import numpy as np
import pytest

from config import parse_args
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
    assert parse_args(["--magnification-dropout", "0.25"]).magnification_dropout == 0.25
    assert parse_args([]).training_hash() != parse_args(["--magnification-dropout", "0.25"]).training_hash()
    with pytest.raises(ValueError, match="magnification_dropout"):
        parse_args(["--magnification-dropout", "1.0"])
