"""Pure metric functions: tuple and patient level, thresholds, fold summaries, statistics."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("accuracy", "balanced_accuracy", "f1", "auc", "sensitivity", "specificity")


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy, F1 (malignant positive), AUC, sensitivity, specificity.

    AUC is NaN when only one class is present (it is undefined, not 0.5).
    """
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    if not np.isfinite(probs).all():
        raise ValueError("non-finite probabilities: refusing to score them")
    pred = (probs >= threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if pos and neg else float("nan"),
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "auc": float(roc_auc_score(labels, probs)) if pos and neg else float("nan"),
        "sensitivity": tp / pos if pos else float("nan"),
        "specificity": tn / neg if neg else float("nan"),
        "n": int(len(labels)),
    }


def patient_probabilities(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (and fold, when pooled): its probability is the mean over its
    tuples, likewise each subtype probability; label, group, subtype and the fold's threshold
    are carried along. The one place where tuples become patients."""
    keys = [k for k in ("fold", "patient") if k in predictions.columns]
    mean_cols = ["prob"] + [c for c in predictions.columns if c.startswith("p_sub_")]
    first_cols = [c for c in ("label", "group", "subtype", "threshold") if c in predictions.columns]
    agg = {c: (c, "first") for c in first_cols}
    agg.update({c: (c, "mean") for c in mean_cols})
    agg["n_tuples"] = ("prob", "size")
    return predictions.groupby(keys, sort=True).agg(**agg).reset_index()


def choose_threshold(labels, probs) -> float:
    """Threshold that maximises balanced accuracy (Youden's J); ties go to the one nearest 0.5.

    Used on the inner validation split only: the test fold never picks anything.
    """
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5
    values = np.unique(probs)
    candidates = np.concatenate([[0.5], (values[:-1] + values[1:]) / 2]) if len(values) > 1 else np.array([0.5])
    scores = [balanced_accuracy_score(labels, (probs >= t).astype(int)) for t in candidates]
    best = np.max(scores)
    ties = candidates[np.isclose(scores, best)]
    return float(ties[np.argmin(np.abs(ties - 0.5))])


def subtype_metrics(subtypes, subtype_probs) -> dict:
    """Macro-F1 and balanced accuracy of the argmax subtype over the classes present."""
    subtypes = np.asarray(subtypes, dtype=int)
    pred = np.asarray(subtype_probs).argmax(axis=1)
    present = np.unique(subtypes)
    return {"subtype_macro_f1": float(f1_score(subtypes, pred, labels=present, average="macro",
                                               zero_division=0)),
            "subtype_balanced_accuracy": float(balanced_accuracy_score(subtypes, pred))}


def fold_metrics(predictions: pd.DataFrame, threshold: float) -> dict:
    """Tuple-level and patient-level metrics of one fold's test predictions."""
    patients = patient_probabilities(predictions)
    result = {"tuple": binary_metrics(predictions["label"], predictions["prob"], threshold),
              "patient": binary_metrics(patients["label"], patients["prob"], threshold)}
    sub_cols = sorted(c for c in predictions.columns if c.startswith("p_sub_"))
    if sub_cols:
        order = sorted(sub_cols, key=lambda c: int(c.removeprefix("p_sub_")))
        result["tuple"].update(subtype_metrics(predictions["subtype"], predictions[order].to_numpy()))
        result["patient"].update(subtype_metrics(patients["subtype"], patients[order].to_numpy()))
    return result


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_mean_sd(values, digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return "n/a" if np.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------- statistics
def pooled_out_of_fold(predictions: list, results: list) -> pd.DataFrame:
    """Concatenate the test predictions of every fold, each tagged with its fold number and
    its fold's decision threshold (from that fold's results)."""
    frames = [frame.assign(fold=r["fold"], threshold=r["threshold"]) for frame, r in zip(predictions, results)]
    return pd.concat(frames, ignore_index=True)


def _units(pooled: pd.DataFrame, level: str) -> pd.DataFrame:
    """Rows that are scored: tuples, or patients (mean probability over their tuples)."""
    if level == "patient":
        pooled = patient_probabilities(pooled.drop(columns="fold", errors="ignore"))
    return pooled.assign(decided=(pooled["prob"] >= pooled["threshold"]).astype(int))


def weighted_metrics(labels: np.ndarray, probs: np.ndarray, decided: np.ndarray, weights: np.ndarray) -> dict:
    """METRICS from a confusion matrix whose rows count `weights` times (a bootstrap draw)."""
    pos, neg = labels == 1, labels == 0
    tp, fn = weights[pos & (decided == 1)].sum(), weights[pos & (decided == 0)].sum()
    tn, fp = weights[neg & (decided == 0)].sum(), weights[neg & (decided == 1)].sum()
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    keep = weights > 0
    auc = (float(roc_auc_score(labels[keep], probs[keep], sample_weight=weights[keep]))
           if (tp + fn) and (tn + fp) else float("nan"))
    return {"accuracy": (tp + tn) / weights.sum(), "balanced_accuracy": (sens + spec) / 2,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0, "auc": auc,
            "sensitivity": sens, "specificity": spec}


def cluster_bootstrap_ci(pooled: pd.DataFrame, level: str, n_boot: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> dict:
    """Point value and 95 % percentile CI per metric, resampling whole patients within class.

    pooled: out-of-fold predictions (patient, label, prob, threshold of the row's fold).
    A draw counts each patient as often as it was picked, with all its tuples: the patient is
    the unit, so duplicating a patient's tuples cannot narrow the interval.
    """
    units = _units(pooled, level)
    codes, patients = pd.factorize(units["patient"])
    label_of = units.groupby(codes)["label"].first().to_numpy()
    strata = [np.flatnonzero(label_of == c) for c in np.unique(label_of)]
    y, p, d = units["label"].to_numpy(), units["prob"].to_numpy(), units["decided"].to_numpy()
    point = weighted_metrics(y, p, d, np.ones(len(units)))
    rng = np.random.default_rng(seed)
    draws = {m: np.empty(n_boot) for m in METRICS}
    for b in range(n_boot):
        picked = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        weights = np.bincount(picked, minlength=len(patients))[codes].astype(float)
        for m, value in weighted_metrics(y, p, d, weights).items():
            draws[m][b] = value
    return {m: (float(point[m]), float(np.nanpercentile(draws[m], 100 * alpha / 2)),
                float(np.nanpercentile(draws[m], 100 * (1 - alpha / 2)))) for m in METRICS}


def corrected_resampled_ttest(differences, n_train: float, n_test: float) -> tuple[float, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-fold differences.

    The variance is inflated by (1/k + n_test/n_train) because cross-validation folds share
    training data. Returns (t, two-sided p) with k - 1 degrees of freedom.
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    k = len(d)
    if k < 2:
        return float("nan"), float("nan")
    variance = d.var(ddof=1)
    if variance == 0:  # identical differences in every fold: no evidence either way, no p
        return (0.0, 1.0) if d.mean() == 0 else (float("nan"), float("nan"))
    t = d.mean() / np.sqrt((1 / k + n_test / n_train) * variance)
    return float(t), float(2 * stats.t.sf(abs(t), df=k - 1))
