"""Pure metric functions: tuple and patient level, thresholds, fold summaries, statistics."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

METRICS = ("accuracy", "balanced_accuracy", "f1", "auc", "sensitivity", "specificity")
# Training draws both classes equally often, so 0.5 is the decision rule of every result; the
# threshold chosen on inner validation (a handful of patients) is reported as a secondary row.
DECISION_THRESHOLD = 0.5


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
    keys = [k for k in ("repeat", "fold", "patient") if k in predictions.columns]
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
            # balanced accuracy = mean recall over the true classes; as recall_score with labels,
            # predictions of absent classes count as errors without sklearn's warning about them
            "subtype_balanced_accuracy": float(recall_score(subtypes, pred, labels=present, average="macro",
                                                            zero_division=0))}


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


def fold_position(run: dict) -> dict[int, tuple[int, int]]:
    """Job number -> (repeat, outer fold). Runs from before results held "outer_fold" count the
    folds of the first repeat."""
    results = run["results"]
    per_repeat = max([r["fold"] for r in results if r.get("repeat", 0) == 0], default=-1) + 1
    return {r["fold"]: (r.get("repeat", 0), r.get("outer_fold", r["fold"] - r.get("repeat", 0) * per_repeat))
            for r in results}


def fold_columns(run: dict, fold: int) -> dict:
    """The fold's columns: its number, or its repeat and outer fold when the folds were repeated
    (a job number such as 13 names nothing a reader can find)."""
    positions = fold_position(run)
    if len({repeat for repeat, _ in positions.values()}) == 1:
        return {"fold": fold}
    repeat, outer = positions[fold]
    return {"repeat": repeat, "fold": outer}


def summary_row(table, skip=()) -> dict:
    """The 'mean ± sd' row of a per-fold table: named in its fold columns (fold_columns), every
    other column but `skip` summarised."""
    labels = {"repeat": "mean ± sd", "fold": ""} if "repeat" in table else {"fold": "mean ± sd"}
    return {**labels, **{c: format_mean_sd(table[c]) for c in table.columns if c not in ("repeat", "fold", *skip)}}


def format_mean_sd(values, digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return "n/a" if np.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------- statistics
def pooled_out_of_fold(predictions: list, results: list) -> pd.DataFrame:
    """Concatenate the test predictions of every fold, each tagged with its fold number and
    its fold's decision threshold (from that fold's results)."""
    frames = [frame.assign(repeat=r.get("repeat", 0), fold=r["fold"], threshold=r["threshold"])
              for frame, r in zip(predictions, results)]
    return pd.concat(frames, ignore_index=True)
