"""What the models weigh, per fold and as fold mean ± sd: magnification importance (the AUC
lost with one magnification masked), MMNet's fusion weights and every model's magnification
weights."""
from __future__ import annotations

import pandas as pd
from sklearn.metrics import roc_auc_score

from utils.metrics import fold_columns, patient_probabilities, summary_row


def _with_summary(table: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([table, pd.DataFrame([summary_row(table)])], ignore_index=True)


def magnification_importance(run: dict) -> pd.DataFrame:
    """Per fold, the drop in patient-level AUC when one magnification is masked out of every
    test tuple (the model sees the other three): what that magnification contributes. Both
    AUCs come from the plain view (prob_plain), not the test-time views."""
    rows = []
    for r, frame in zip(run["results"], run["predictions"]):
        masked = [c for c in frame.columns if c.startswith("prob_without_")]  # in magnification order
        full = patient_probabilities(frame.assign(prob=frame.get("prob_plain", frame["prob"])))
        if not masked or full["label"].nunique() < 2:
            continue
        row = fold_columns(run, r["fold"])
        for column in masked:
            without = patient_probabilities(frame.assign(prob=frame[column]))
            row[column.removeprefix("prob_without_").upper()] = round(
                roc_auc_score(full["label"], full["prob"]) - roc_auc_score(without["label"], without["prob"]), 4)
        rows.append(row)
    return _with_summary(pd.DataFrame(rows)) if rows else pd.DataFrame()


def fusion_weights(run: dict) -> pd.DataFrame:
    """Mean fusion weight per magnification on each fold's test tuples. Taken after the
    hierarchical attention has mixed the levels: a weight says how the fused vector is
    formed, not what a magnification's images contribute (see magnification_importance)."""
    rows = [{**fold_columns(run, r["fold"]), **means.round(4).to_dict()}
            for r, means in zip(run["results"], _fold_weight_means(run))
            if len(means)]  # none for a fusion that mixes magnifications inside its vector (--fusion concat)
    return _with_summary(pd.DataFrame(rows)) if rows else pd.DataFrame()


def _fold_weight_means(run: dict) -> list[pd.Series]:
    """Per fold, the mean of each w_ column over the test samples, indexed '40X'..."""
    return [frame[[c for c in frame.columns if c.startswith("w_")]].mean().rename(lambda c: c.removeprefix("w_").upper())
            for frame in run["predictions"]]


def magnification_weights(runs: dict) -> pd.DataFrame:
    """Per experiment whose model gives magnification weights (w_ columns, more than one):
    the mean weight of each magnification over every fold's test samples."""
    rows = []
    for name, run in runs.items():
        folds = _fold_weight_means(run)
        if folds and len(folds[0]) > 1:
            rows.append({"experiment": name, **pd.concat(folds, axis=1).mean(axis=1).round(4).to_dict()})
    return pd.DataFrame(rows)
