"""Conformal prediction sets: the per-class coverage guarantee on exchangeable scores, the set
rule against the quantile rule computed by hand, and calibration that never reads the patients
it decides."""
import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("crepes")
from utils.report.conformal import conformal_rows, cross_fitted_p_values, cross_fitted_sets, prediction_sets  # noqa: E402


def _quantile_rule(cal_prob, cal_labels, test_prob, alpha):
    """Label k is in the set when its non-conformity is at most the ceil((n_k + 1)(1 - alpha))-th
    smallest calibration score of class k (every label when that rank exceeds n_k)."""
    cal_prob, cal_labels = np.asarray(cal_prob), np.asarray(cal_labels)
    out = np.zeros((len(test_prob), 2), bool)
    for k in (0, 1):
        scores = np.sort(np.where(k == 1, 1 - cal_prob, cal_prob)[cal_labels == k])
        rank = math.ceil((len(scores) + 1) * (1 - alpha))
        limit = np.inf if rank > len(scores) else scores[rank - 1]
        out[:, k] = np.where(k == 1, 1 - np.asarray(test_prob), np.asarray(test_prob)) <= limit
    return out


def test_the_set_rule_is_the_quantile_rule():
    rng = np.random.default_rng(0)
    for n, alpha in ((9, 0.1), (30, 0.05), (50, 0.2), (4, 0.1)):
        cal_labels = rng.integers(0, 2, n)
        cal_prob = np.clip(0.5 + 0.3 * (2 * cal_labels - 1) + rng.normal(0, 0.25, n), 0, 1)
        test_prob = rng.random(200)
        assert (prediction_sets(cal_prob, cal_labels, test_prob, alpha)
                == _quantile_rule(cal_prob, cal_labels, test_prob, alpha)).all()


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_per_class_coverage_on_exchangeable_scores_lies_within_the_finite_sample_bounds(alpha):
    """Calibration and test patients drawn alike (19 per class): over 3,000 draws the share of
    test patients whose set holds their label lies in [1 - alpha, 1 - alpha + 1/(n + 1)] for
    benign and malignant patients apart (Monte Carlo error allowed: 4 standard errors)."""
    rng = np.random.default_rng(1)
    n, draws = 19, 3000
    covered = {0: [], 1: []}
    for _ in range(draws):
        labels = np.repeat([0, 1], n + 1)
        prob = np.clip(0.5 + 0.2 * (2 * labels - 1) + rng.normal(0, 0.3, len(labels)), 0, 1)
        test = np.array([n, 2 * n + 1])  # the last patient of each class is tested, the others calibrate
        cal = np.setdiff1d(np.arange(len(labels)), test)
        sets = prediction_sets(prob[cal], labels[cal], prob[test], alpha)
        covered[0].append(sets[0, 0])
        covered[1].append(sets[1, 1])
    for k in (0, 1):
        rate = np.mean(covered[k])
        slack = 4 * np.sqrt(rate * (1 - rate) / draws)
        assert 1 - alpha - slack <= rate <= 1 - alpha + 1 / (n + 1) + slack, (k, rate)


def _patients(seed=0, folds=4, per_fold=10):
    rng = np.random.default_rng(seed)
    n = folds * per_fold
    labels = np.arange(n) % 2
    return pd.DataFrame({"repeat": 0, "fold": np.arange(n) // per_fold, "patient": [f"p{i}" for i in range(n)],
                         "group": [f"g{i // 2}" for i in range(n)], "label": labels,
                         "prob": np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.25, n), 0, 1)})


def test_a_folds_sets_never_read_its_own_patients():
    """Turning fold 0's labels and scores around changes no set of fold 0 (it is calibrated on
    folds 1-3 only) and changes sets of other folds (fold 0 calibrates them)."""
    patients = _patients()
    before = cross_fitted_sets(patients, 0.2).set_index("patient")["set"]
    turned = patients.copy()
    own = turned["fold"] == 0
    turned.loc[own, "label"] = 1 - turned.loc[own, "label"]
    after = cross_fitted_sets(turned, 0.2).set_index("patient")["set"]
    zero = patients.loc[own, "patient"]
    others = patients.loc[~own, "patient"]
    assert (before[zero] == after[zero]).all() and (before[others] != after[others]).any()


def test_the_table_row_counts_patients_once_and_refers_the_undecided():
    patients = _patients()
    row = conformal_rows("mmnet", cross_fitted_p_values(patients), 0.1, n_boot=50, seed=0)
    sets = cross_fitted_sets(patients, 0.1)
    assert row["patients"] == 40
    assert row["referred"] == pytest.approx(sets["set"].isin(["refer", "empty"]).mean())
    covered = np.where(sets["label"] == 1, sets["malignant"], sets["benign"])
    assert row["coverage_malignant"] == pytest.approx(covered[sets["label"] == 1].mean())
    assert row["coverage_malignant_ci"][0] <= row["coverage_malignant"] <= row["coverage_malignant_ci"][1]


def test_a_new_patient_is_decided_against_calibration_patients_of_its_kind():
    """decide(): a confident score gets one label, a middling one both (refer); a patient lacking
    the magnification the 'without' scores lack is calibrated on those; lacking two, no set."""
    from utils.report.conformal import decide

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 30)
    prob = np.clip(0.5 + 0.35 * (2 * labels - 1) + rng.normal(0, 0.1, 60), 0, 1)
    stored = {"alpha": 0.1, "temperature": 2.0,
              "calibration": {"all": {"prob": prob.tolist(), "label": labels.tolist()},
                              "without_40x": {"prob": (0.5 + (prob - 0.5) / 3).tolist(), "label": labels.tolist()}}}
    assert decide(stored, 0.99, [])["conformal_decision"] == "malignant"
    assert decide(stored, 0.01, [])["conformal_decision"] == "benign"
    assert decide(stored, 0.5, [])["conformal_decision"] == "refer"
    assert decide(stored, 0.99, [])["calibrated_probability"] == pytest.approx(1 / (1 + (0.01 / 0.99) ** 0.5), abs=1e-4)
    # 0.62 is typical of malignant patients scored without 40X (whose scores are flatter), and of
    # neither class among complete patients: an empty set there, which is referred too
    assert decide(stored, 0.62, ["40x"])["conformal_decision"] == "malignant"
    complete = decide(stored, 0.62, [])
    assert complete["conformal_set"] == [] and complete["conformal_decision"] == "refer"
    none = decide(stored, 0.9, ["40x", "100x"])
    assert none["conformal_set"] is None and "40X, 100X" in none["conformal_note"]


def test_temperature_scaling_fits_an_overconfident_model_and_keeps_its_decisions():
    """Scores that are twice as sure as they should be (logits doubled): the fitted temperature
    is about 2, no decision at 0.5 changes, and cross-fitting never uses a fold's own patients."""
    from scipy.special import expit, logit

    from utils.report.temperature import cross_fitted, fit_temperature, scaled

    rng = np.random.default_rng(5)
    true_logit = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < expit(true_logit)).astype(int)
    over = expit(2 * true_logit)
    assert fit_temperature(over, labels) == pytest.approx(2.0, rel=0.05)
    assert ((scaled(over, 2.0) >= 0.5) == (over >= 0.5)).all()
    patients = _patients()
    base = cross_fitted(patients)
    turned = patients.copy()
    turned.loc[turned["fold"] == 0, "label"] = 1 - turned.loc[turned["fold"] == 0, "label"]
    assert np.allclose(base[patients["fold"] == 0], cross_fitted(turned)[patients["fold"] == 0])
    assert np.isfinite(logit(np.clip(base, 1e-6, 1 - 1e-6))).all()
