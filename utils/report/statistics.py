"""Statistics of pooled out-of-fold predictions, pure NumPy/SciPy (no torch).

- slide-group bootstrap (the 70 numeric slide groups are the independent units, not the 82
  patient folders), all draws at once, stratified by class;
- paired bootstrap of the difference between two models on the same draws;
- Nadeau & Bengio's corrected resampled t-test across folds, Holm's step-down adjustment,
  Wilson intervals for proportions, patient-level calibration corrected for the training prior.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from utils.metrics import METRICS, patient_probabilities

Z95 = stats.norm.ppf(0.975)


def scored_units(pooled: pd.DataFrame, level: str) -> pd.DataFrame:
    """Rows that are scored: tuples, or patients (mean probability over their tuples), with
    their decision at the fold's threshold."""
    if level == "patient":
        pooled = patient_probabilities(pooled.drop(columns="fold", errors="ignore"))
    return pooled.assign(decided=(pooled["prob"] >= pooled["threshold"]).astype(int))


def group_draws(group_labels: pd.Series, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, G) times each slide group is drawn; groups resampled within their class, so
    every draw keeps the class balance of the data."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(group_labels)))
    labels = group_labels.to_numpy()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n_boot)
    return counts


def _weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of each row of weights w (B, U): weighted Mann-Whitney, ties count half."""
    order = np.argsort(p, kind="stable")
    y, p, w = y[order], p[order], w[:, order]
    neg = np.cumsum(w * (y == 0), axis=1)
    tie = np.searchsorted(p, p, side="left"), np.searchsorted(p, p, side="right") - 1
    below = np.where(tie[0] > 0, neg[:, np.maximum(tie[0] - 1, 0)], 0.0)
    equal = neg[:, tie[1]] - below
    pos_w = w * (y == 1)
    denominator = pos_w.sum(1) * (w * (y == 0)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (pos_w * (below + 0.5 * equal)).sum(1) / denominator, np.nan)


def weighted_metrics(y: np.ndarray, p: np.ndarray, decided: np.ndarray, w: np.ndarray) -> dict:
    """METRICS for each row of weights w (B, U): a unit counts as often as it was drawn."""
    pos, neg, yes = y == 1, y == 0, decided == 1
    tp, fn = w @ (pos & yes), w @ (pos & ~yes)
    tn, fp = w @ (neg & ~yes), w @ (neg & yes)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        return {"accuracy": (tp + tn) / w.sum(1), "balanced_accuracy": (sens + spec) / 2,
                "f1": np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0), "auc": _weighted_auc(y, p, w),
                "sensitivity": sens, "specificity": spec}


def _unit_weights(units: pd.DataFrame, groups: pd.Index, draws: np.ndarray) -> np.ndarray:
    return draws[:, groups.get_indexer(units["group"].astype(str))]


def _group_table(*frames: pd.DataFrame) -> pd.Series:
    both = pd.concat([f[["group", "label"]] for f in frames]).astype({"group": str})
    return both.groupby("group")["label"].agg(lambda s: int(s.mean() >= 0.5))


def _percentiles(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(np.percentile(values, 100 * alpha / 2)), float(np.percentile(values, 100 * (1 - alpha / 2)))


def bootstrap_ci(pooled: pd.DataFrame, level: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """metric -> (pooled value, 95 % percentile CI), slide groups resampled within class.

    A draw counts each slide group as often as it was picked, with all its patients and
    tuples: duplicating a patient's tuples cannot narrow the interval.
    """
    units = scored_units(pooled, level)
    groups = _group_table(units)
    w = _unit_weights(units, groups.index, group_draws(groups, n_boot, seed))
    args = units["label"].to_numpy(), units["prob"].to_numpy(), units["decided"].to_numpy()
    point = weighted_metrics(*args, np.ones((1, len(units))))
    draws = weighted_metrics(*args, w)
    return {m: (float(point[m][0]), *_percentiles(draws[m])) for m in METRICS}


def paired_difference_ci(pooled_a: pd.DataFrame, pooled_b: pd.DataFrame, metrics, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """metric -> (a - b, 95 % CI) at patient level, both models scored on the same group draws."""
    units = [scored_units(frame, "patient") for frame in (pooled_a, pooled_b)]
    groups = _group_table(*units)
    draws = group_draws(groups, n_boot, seed)
    values = []
    for u in units:
        args = u["label"].to_numpy(), u["prob"].to_numpy(), u["decided"].to_numpy()
        values.append((weighted_metrics(*args, np.ones((1, len(u)))),
                       weighted_metrics(*args, _unit_weights(u, groups.index, draws))))
    return {m: (float(values[0][0][m][0] - values[1][0][m][0]), *_percentiles(values[0][1][m] - values[1][1][m]))
            for m in metrics}


TIE_TOLERANCE = 1e-9  # differences this close, relative to their size, are equal (rounding)


def _all_equal(d: np.ndarray) -> bool:
    """True when the differences differ only by rounding: their spread is below TIE_TOLERANCE
    of their magnitude (0.05 + 1e-17 i are five equal differences, not a t of 1e15)."""
    return bool(d.std(ddof=1) <= TIE_TOLERANCE * max(np.abs(d).max(), 1e-12))


def corrected_resampled_ttest(differences, n_train: float, n_test: float, folds: int | None = None
                              ) -> tuple[float, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-job differences (k folds, or
    k x r jobs of a repeated cross-validation, Bouckaert & Frank 2004).

    The variance is inflated by (1/n + n_test/n_train) because the jobs share training data.
    Returns (t, two-sided p) with n - 1 degrees of freedom. When every job shows the same
    non-zero difference the t statistic is infinite; the exact two-sided sign test over the
    `folds` distinct outer folds (p = 2 * 0.5^k) is returned instead: repeats of a fold are
    not independent evidence, so k x r jobs do not count as k x r coin flips.
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    if _all_equal(d):
        if np.abs(d).max() <= TIE_TOLERANCE:
            return 0.0, 1.0
        return float(np.sign(d.mean()) * np.inf), min(1.0, 2 * 0.5 ** min(n, folds or n))
    t = d.mean() / np.sqrt((1 / n + n_test / n_train) * d.var(ddof=1))
    return float(t), float(2 * stats.t.sf(abs(t), df=n - 1))


def corrected_t_interval(differences, n_train: float, n_test: float) -> tuple[float, float, float]:
    """(mean, 95 % low, high) of per-job differences with the corrected variance above: the
    fold-mean counterpart of the pooled difference (it does not charge calibration differences
    between folds, which a pooled AUC does)."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else float("nan")), float("nan"), float("nan")
    half = stats.t.ppf(0.975, df=n - 1) * np.sqrt((1 / n + n_test / n_train) * d.var(ddof=1))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of one family of p-values (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def wilson(successes: float, n: float) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: sensible at 0 and 1, unlike the percentile
    bootstrap, which collapses to [1, 1] at a perfect score."""
    if n <= 0:
        return float("nan"), float("nan")
    phat, z2 = successes / n, Z95 ** 2
    centre = (phat + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * np.sqrt(phat * (1 - phat) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def effective_size(correct: np.ndarray, groups: np.ndarray) -> float:
    """Patients' worth of independent evidence in a proportion whose units are clustered in
    slide groups (Korn & Graubard 1998): n_eff = p (1 - p) / var(p), with var(p) the ratio
    estimator's between-group variance. Kept between the number of groups (every group one
    unit) and of patients; where p is 0 or 1 no variance is seen, and the number of groups is
    used. `correct`: per patient, the share of its tests decided right (0/1 without repeats)."""
    correct = np.asarray(correct, float)
    frame = pd.DataFrame({"y": correct, "g": np.asarray(groups).astype(str)}).groupby("g")["y"].agg(["sum", "size"])
    n, g = len(correct), len(frame)
    p = correct.mean() if n else float("nan")
    if g < 2 or not 0 < p < 1:
        return float(g)
    variance = g / (g - 1) * ((frame["sum"] - p * frame["size"]) ** 2).sum() / n ** 2
    return float(np.clip(p * (1 - p) / variance, g, n)) if variance > 0 else float(n)


def clustered_wilson(correct, groups) -> tuple[float, float]:
    """95 % Wilson interval of the share of `correct` at the effective sample size of its slide
    groups (effective_size): the Wilson interval of independent patients when every group holds
    one, wider where patients of one group decide alike."""
    correct = np.asarray(correct, float)
    if not len(correct):
        return float("nan"), float("nan")
    n_eff = effective_size(correct, groups)
    return wilson(correct.mean() * n_eff, n_eff)


def other_folds(patients: pd.DataFrame):
    """(test rows, calibration rows) per outer fold: each fold's patient rows with the other
    folds' rows of the same repeat, never its own (cross-fitting of calibration steps)."""
    for (repeat, fold), test in patients.groupby(["repeat", "fold"], sort=True):
        yield test, patients[(patients["repeat"] == repeat) & (patients["fold"] != fold)]


def prior_corrected(prob: np.ndarray, prevalence: np.ndarray, trained_prior: float = 0.5) -> np.ndarray:
    """Probabilities of a model trained on a class-balanced sampler, moved to the prevalence of
    its fold's training patients (Saerens et al. 2002): odds * (pi / (1 - pi)) / (q / (1 - q))."""
    prob = np.clip(np.asarray(prob, float), 1e-7, 1 - 1e-7)
    ratio = (prevalence / (1 - prevalence)) / (trained_prior / (1 - trained_prior))
    odds = prob / (1 - prob) * ratio
    return odds / (1 + odds)


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """Mean |observed - predicted| over equal-width probability bins, weighted by bin size."""
    labels, probs = np.asarray(labels, float), np.asarray(probs, float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(labels[inside].mean() - probs[inside].mean())
    return float(total / len(labels))
