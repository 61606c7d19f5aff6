"""Paired comparisons on the patients both sides scored.

A single-magnification baseline leaves out the patients who lack its magnification, an
experiment (or an encoder of --backbones) may lack a fold: a difference between two models is
then computed on the tests both scored (each patient in each repeat), never on two different
sets of patients, and the table says how many patients it rests on and how many were scored by
one side only. Reads frames only (no torch).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from utils.metrics import fold_metrics
from utils.report.statistics import corrected_resampled_ttest, corrected_t_interval, paired_difference_ci


def _tests(pooled: pd.DataFrame) -> pd.Series:
    """(repeat, patient) of every prediction row: one test of a patient."""
    return pd.Series(list(zip(pooled["repeat"], pooled["patient"])), index=pooled.index)


def on_common_patients(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Both pooled prediction frames cut to the patient tests both scored, and the counts of
    patients (each once): 'paired_patients' both scored, 'unpaired_patients' one side only."""
    tests = [_tests(a), _tests(b)]
    both = set(tests[0]) & set(tests[1])
    cut = [frame[keys.isin(both)] for frame, keys in zip((a, b), tests)]
    paired = {patient for _, patient in both}
    scored = set(a["patient"]) | set(b["patient"])
    return cut[0], cut[1], {"paired_patients": len(paired), "unpaired_patients": len(scored - paired)}


def _per_fold(pooled: pd.DataFrame, metric: str) -> dict:
    """fold (job) -> the patient-level metric of that fold's rows at its own threshold."""
    return {fold: fold_metrics(part, float(part["threshold"].iloc[0]))["patient"][metric]
            for fold, part in pooled.groupby("fold")}


def paired_comparison(run: dict, ref: dict, metric: str, n_boot: int, seed: int) -> dict:
    """A model against the reference at patient level, both on the tests both scored: per-fold
    differences with the corrected t-test and interval, the pooled difference with its paired
    slide-group bootstrap CI, and the patient counts behind them."""
    mine, theirs, counts = on_common_patients(run["pooled"], ref["pooled"])
    if not counts["paired_patients"]:
        nan = float("nan")
        return {**counts, "diff_fold_mean": nan, "diff_fold_ci_low": nan, "diff_fold_ci_high": nan,
                "p_value": nan, "diff_pooled": nan, "diff_ci_low": nan, "diff_ci_high": nan}
    values, ref_values = _per_fold(mine, metric), _per_fold(theirs, metric)
    paired = [values[f] - ref_values[f] for f in sorted(values) if f in ref_values]
    n_test = np.mean([r["patients"]["test"] for r in run["results"]])
    n_train = np.mean([r["patients"]["train"] + r["patients"].get("val", 0) for r in run["results"]])
    diff, low, high = paired_difference_ci(mine, theirs, [metric], n_boot, seed)[metric]
    folds = len({r["fold"] for r in run["results"] if r.get("repeat", 0) == 0})  # distinct outer folds
    fold_mean, fold_low, fold_high = corrected_t_interval(paired, n_train, n_test)
    return {**counts, "diff_fold_mean": fold_mean, "diff_fold_ci_low": fold_low, "diff_fold_ci_high": fold_high,
            "p_value": corrected_resampled_ttest(paired, n_train, n_test, folds)[1],
            "diff_pooled": diff, "diff_ci_low": low, "diff_ci_high": high}


def paired_count_text(paired: float, unpaired: float) -> str:
    """The cell that says what a comparison rests on."""
    if not np.isfinite(paired):
        return "n/a"
    text = f"{int(paired)}"
    if unpaired:
        text += f" ({int(unpaired)} scored by one side only, left out)"
    return text
