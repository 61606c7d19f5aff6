"""Result tables from output/ files alone (never imports torch). Every metric is computed
here from predictions.csv; results.json contributes only what training knows (threshold,
epochs, timings, patient counts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from config import SUBTYPES
from utils.metrics import (METRICS, cluster_bootstrap_ci, corrected_resampled_ttest, fold_metrics, format_mean_sd,
                           mean_sd, patient_probabilities, pooled_out_of_fold)


# ---------------------------------------------------------------- results of the runs
LEVELS = ("patient", "tuple")
SHOWN = METRICS
SHORT = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "f1": "f1", "auc": "auc",
         "sensitivity": "sens", "specificity": "spec"}


def load_results(output_dir: str | Path, experiment: str) -> list[dict]:
    paths = sorted((Path(output_dir) / "runs" / experiment).glob("fold*/results.json"))
    return [json.loads(p.read_text()) for p in paths]


def load_runs(output_dir: str | Path, experiments) -> dict[str, dict]:
    """name -> {results, predictions, histories, pooled, metrics} for every experiment with
    finished folds; pooled: all out-of-fold test predictions with each fold's number and
    threshold; metrics: fold -> fold_metrics() of that fold's predictions."""
    runs = {}
    for name in experiments:
        results = load_results(output_dir, name)
        if not results:
            continue
        folder = Path(output_dir) / "runs" / name
        runs[name] = {"results": results,
                      "predictions": [pd.read_csv(folder / f"fold{r['fold']}" / "predictions.csv",
                                                  dtype={"group": str}) for r in results],
                      "histories": [pd.read_csv(folder / f"fold{r['fold']}" / "history.csv") for r in results]}
        runs[name]["pooled"] = pooled_out_of_fold(runs[name]["predictions"], results)
        runs[name]["metrics"] = {r["fold"]: fold_metrics(frame, r["threshold"])
                                 for r, frame in zip(results, runs[name]["predictions"])}
    return runs


def fold_table(run: dict) -> pd.DataFrame:
    """One row per fold (both levels) plus a 'mean ± sd' row."""
    rows = []
    for r in run["results"]:
        row = {"fold": r["fold"], "threshold": round(r["threshold"], 3), "best_epoch": r["best_epoch"] + 1}
        for level in LEVELS:
            row.update({f"{level}_{m}": run["metrics"][r["fold"]][level][m] for m in SHOWN})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        summary = {c: format_mean_sd(table[c]) for c in table.columns if c not in ("fold", "best_epoch")}
        table = pd.concat([table.round(4), pd.DataFrame([{"fold": "mean ± sd", "best_epoch": "", **summary}])],
                          ignore_index=True)
    return table


def _fold_values(run: dict, level: str, metric: str) -> dict:
    return {fold: metrics[level][metric] for fold, metrics in run["metrics"].items()}


def statistics(runs: dict, n_boot: int, seed: int, reference: str = "mmnet") -> pd.DataFrame:
    """Long table: experiment x level x metric -> fold mean/sd, pooled value, bootstrap CI,
    paired difference with the reference and the corrected resampled t-test p-value."""
    rows = []
    for name, run in runs.items():
        pooled = run["pooled"]
        n_test = np.mean([r["patients"]["test"] for r in run["results"]])
        n_train = np.mean([r["patients"]["train"] + r["patients"]["val"] for r in run["results"]])
        for level in LEVELS:
            ci = cluster_bootstrap_ci(pooled, level, n_boot=n_boot, seed=seed)
            for metric in SHOWN:
                values = _fold_values(run, level, metric)
                mean, sd = mean_sd(list(values.values()))
                diff, p = float("nan"), float("nan")
                if reference in runs and name != reference:
                    ref = _fold_values(runs[reference], level, metric)
                    paired = [values[f] - ref[f] for f in sorted(values) if f in ref]
                    diff = float(np.nanmean(paired)) if paired else float("nan")
                    p = corrected_resampled_ttest(paired, n_train, n_test)[1]
                rows.append({"experiment": name, "level": level, "metric": metric, "fold_mean": mean,
                             "fold_sd": sd, "pooled": ci[metric][0], "ci_low": ci[metric][1],
                             "ci_high": ci[metric][2], "diff_vs_" + reference: diff, "p_value": p})
    return pd.DataFrame(rows)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def comparison_table(stats: pd.DataFrame, experiments, level: str = "patient",
                     reference: str = "mmnet") -> pd.DataFrame:
    """Experiments x metrics as 'fold mean ± sd; pooled [95 % CI]' plus paired differences (p).

    The pooled value and its CI come from all out-of-fold predictions together; a pooled AUC
    also ranks patients across folds, so it can differ from the mean of per-fold AUCs."""
    rows = []
    for name in [e for e in experiments if e in set(stats["experiment"])]:
        part = stats[(stats["experiment"] == name) & (stats["level"] == level)].set_index("metric")
        row = {"experiment": name}
        for m in SHOWN:
            r = part.loc[m]
            row[SHORT[m]] = (f"{_fmt(r['fold_mean'])} ± {_fmt(r['fold_sd'])}; "
                             f"{_fmt(r['pooled'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        for m in ("balanced_accuracy", "auc"):
            r = part.loc[m]
            row[f"Δ{SHORT[m]} (p)"] = ("reference" if name == reference else
                                       f"{_fmt(r['diff_vs_' + reference], 3)} (p={_fmt(r['p_value'], 3)})")
        rows.append(row)
    return pd.DataFrame(rows)


def per_fold_table(runs: dict) -> pd.DataFrame:
    rows = [{"experiment": name, "fold": r["fold"],
             **{SHORT[m]: round(run["metrics"][r["fold"]]["patient"][m], 4) for m in SHOWN}}
            for name, run in runs.items() for r in run["results"]]
    return pd.DataFrame(rows)


def subtype_tables(runs: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Binary recall per subtype (pooled patients, 'correct/total') and the subtype head's scores."""
    recall_rows, head_rows = [], []
    for name, run in runs.items():
        patients = patient_probabilities(run["pooled"])
        patients["correct"] = (patients["prob"] >= patients["threshold"]).astype(int) == patients["label"]
        row = {"experiment": name}
        for code, part in patients.groupby("subtype"):
            row[SUBTYPES[int(code)]] = f"{int(part['correct'].sum())}/{len(part)}"
        recall_rows.append(row)
        folds = [m["patient"] for m in run["metrics"].values()]
        if all("subtype_macro_f1" in m for m in folds):
            head_rows.append({"experiment": name,
                              "subtype_macro_f1": format_mean_sd([m["subtype_macro_f1"] for m in folds]),
                              "subtype_balanced_accuracy": format_mean_sd(
                                  [m["subtype_balanced_accuracy"] for m in folds])})
    return pd.DataFrame(recall_rows), pd.DataFrame(head_rows)


def magnification_importance(run: dict) -> pd.DataFrame:
    """Mean fusion weight per magnification on each fold's test tuples, and mean ± sd."""
    rows = []
    for r, frame in zip(run["results"], run["predictions"]):
        weights = frame[[c for c in frame.columns if c.startswith("w_")]].mean()
        rows.append({"fold": r["fold"], **{k: round(v, 4) for k, v in weights.items()}})
    table = pd.DataFrame(rows)
    summary = {c: format_mean_sd(table[c]) for c in table.columns if c != "fold"}
    return pd.concat([table, pd.DataFrame([{"fold": "mean ± sd", **summary}])], ignore_index=True)


def timing_table(runs: dict) -> pd.DataFrame:
    rows = [{"experiment": name, "folds": len(run["results"]),
             "epochs_run": sum(r["epochs_run"] for r in run["results"]),
             "train_minutes": round(sum(r["train_seconds"] for r in run["results"]) / 60, 2)}
            for name, run in runs.items()]
    table = pd.DataFrame(rows)
    if len(table):
        table.loc[len(table)] = {"experiment": "total", "folds": table["folds"].sum(),
                                 "epochs_run": table["epochs_run"].sum(),
                                 "train_minutes": round(table["train_minutes"].sum(), 2)}
    return table
