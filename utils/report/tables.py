"""Result tables from output/ files alone (never imports torch). Every metric is computed
here from predictions.csv; results.json contributes only what training knows (threshold,
epochs, timings, patient counts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss

from config import SUBTYPES, experiment_config
from utils.files import steps
from utils.metrics import (
    METRICS,
    fold_columns,
    fold_metrics,
    format_mean_sd,
    mean_sd,
    patient_probabilities,
    pooled_out_of_fold,
    summary_row,
)
from utils.report.paired import paired_comparison, paired_count_text
from utils.report.statistics import bootstrap_ci, clustered_wilson, expected_calibration_error, holm, prior_corrected, scored_units
from utils.report.temperature import cross_fitted

# ---------------------------------------------------------------- results of the runs
LEVELS = ("patient", "tuple")
SHOWN = METRICS
SHORT = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "f1": "f1", "auc": "auc",
         "sensitivity": "sens", "specificity": "spec"}


def load_results(output_dir: str | Path, experiment: str) -> list[dict]:
    """Finished outer folds in job order (fold2 before fold10); a --select candidate's inner
    jobs are only its scores, never a result."""
    paths = sorted((Path(output_dir) / "runs" / experiment).glob("fold*/results.json"),
                   key=lambda p: int(p.parent.name.removeprefix("fold")))
    return [r for r in (json.loads(p.read_text()) for p in paths) if "inner_of" not in r]


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
        row = {**fold_columns(run, r["fold"]), "threshold": round(r["threshold"], 3), "best_epoch": r["best_epoch"] + 1}
        for level in LEVELS:
            row.update({f"{level}_{m}": run["metrics"][r["fold"]][level][m] for m in SHOWN})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        summary = {**summary_row(table, skip=("best_epoch",)), "best_epoch": ""}
        table = pd.concat([table.round(4), pd.DataFrame([summary])], ignore_index=True)
    return table


def _fold_values(run: dict, level: str, metric: str) -> dict:
    return {fold: metrics[level][metric] for fold, metrics in run["metrics"].items()}


PROPORTIONS = ("accuracy", "sensitivity", "specificity")  # patient level: Wilson intervals
COMPARED = ("balanced_accuracy", "auc")  # metrics on which models are compared with MMNet


def patient_outcomes(pooled: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, counted once however many repeats tested it: label, group, subtype,
    its mean probability over its tests, `correct`: the share of its tests decided right (0 or 1
    with one repeat), and `tests`. Proportions over these rows equal the pooled proportions of
    the tests (every patient is tested once per repeat)."""
    units = scored_units(pooled, "patient")
    units = units.assign(correct=(units["decided"] == units["label"]).astype(float))
    agg = {c: "first" for c in ("label", "group", "subtype") if c in units}
    out = units.groupby("patient", sort=True).agg({**agg, "prob": "mean", "correct": "mean", "threshold": "mean"})
    return out.assign(tests=units.groupby("patient").size()).reset_index()


PROPORTION_OF = {"accuracy": lambda u: u["label"] >= 0, "sensitivity": lambda u: u["label"] == 1,
                 "specificity": lambda u: u["label"] == 0}  # the patients each proportion is over


def patient_proportion(pooled: pd.DataFrame, metric: str) -> dict:
    """A patient-level proportion as successes / trials of patients counted once (successes
    fractional where a patient's repeats disagree), with its Wilson interval at the slide groups'
    effective sample size: point and interval from the same counts."""
    units = patient_outcomes(pooled)
    part = units[PROPORTION_OF[metric](units)]
    low, high = clustered_wilson(part["correct"], part["group"])
    trials = len(part)
    return {"value": float(part["correct"].mean()) if trials else float("nan"), "ci_low": low, "ci_high": high,
            "successes": float(part["correct"].sum()), "trials": trials}


PROPORTION_CI = "Wilson (slide-group effective n)"


def _level_rows(name: str, run: dict, level: str, n_boot: int, seed: int) -> list[dict]:
    ci = bootstrap_ci(run["pooled"], level, n_boot=n_boot, seed=seed)
    patients = run["pooled"]["patient"].nunique()
    rows = []
    for metric in SHOWN:
        mean, sd = mean_sd(list(_fold_values(run, level, metric).values()))
        row = {"experiment": name, "level": level, "metric": metric, "fold_mean": mean, "fold_sd": sd,
               "pooled": ci[metric][0], "ci_low": ci[metric][1], "ci_high": ci[metric][2],
               "ci_method": "slide-group bootstrap", "patients": patients}
        if level == "patient" and metric in PROPORTIONS:
            counted = patient_proportion(run["pooled"], metric)
            row.update(pooled=counted["value"], ci_low=counted["ci_low"], ci_high=counted["ci_high"],
                       ci_method=PROPORTION_CI, successes=counted["successes"], trials=counted["trials"])
        rows.append(row)
    return rows


def statistics(runs: dict, n_boot: int, seed: int, families: dict, reference: str = "mmnet") -> pd.DataFrame:
    """Long table: experiment x level x metric -> fold mean/sd, pooled value and its CI; for
    the compared metrics at patient level also the paired comparison with the reference,
    with p-values Holm-adjusted within each family (one family per results table)."""
    rows = [row for name, run in steps(runs.items(), "bootstrap intervals", len(runs)) for level in LEVELS
            for row in _level_rows(name, run, level, n_boot, seed)]
    stats = pd.DataFrame(rows)
    if reference not in runs:
        return stats
    stats["family"] = None
    for family, members in families.items():
        keys = [(name, metric) for name in members if name in runs and name != reference for metric in COMPARED]
        tests = {key: paired_comparison(runs[key[0]], runs[reference], key[1], n_boot, seed) for key in keys}
        adjusted = holm([t["p_value"] for t in tests.values()])
        for (key, test), p_holm in zip(tests.items(), adjusted):
            where = (stats["experiment"] == key[0]) & (stats["level"] == "patient") & (stats["metric"] == key[1])
            if stats.loc[where, "family"].notna().any():  # in a second family: its own row, its own Holm p
                stats = pd.concat([stats, stats.loc[where & stats["family"].notna()].head(1)], ignore_index=True)
                where = stats.index == stats.index[-1]
            for column, value in {**test, "p_holm": p_holm, "family": family}.items():
                stats.loc[where, column] = value
    return stats


def family_rows(stats: pd.DataFrame, experiments, level: str, family: str | None = None) -> pd.DataFrame:
    """The rows of `experiments` at `level` as one comparison table reads them: an experiment in
    two families (mmnet_no_fusion: ablation and fusion) has a compared row per family."""
    part = stats[stats["experiment"].isin(experiments) & (stats["level"] == level)]
    return part[part["family"].isna() | (part["family"] == family)] if "family" in part else part


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def comparison_table(stats: pd.DataFrame, experiments, level: str = "patient", family: str | None = None,
                     reference: str = "mmnet") -> pd.DataFrame:
    """Experiments x metrics as 'pooled [95 % CI]' (all out-of-fold predictions together), the
    fold mean ± sd of balanced accuracy, and at patient level the paired comparison with the
    reference (pooled difference [paired CI], Holm-adjusted p). The per-sample table has no
    comparison: an MMNet sample is 4 images, a single-magnification sample 1."""
    rows, stats = [], family_rows(stats, experiments, level, family)
    present = [e for e in experiments if e in set(stats["experiment"])]
    compared = level == "patient" and reference in present and len(present) > 1  # else no Δ columns
    for name in present:
        part = stats[stats["experiment"] == name].set_index("metric")
        row = {"experiment": name}
        for m in SHOWN:
            r = part.loc[m]
            row[SHORT[m]] = f"{_fmt(r['pooled'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        bal = part.loc["balanced_accuracy"]
        row["bal_acc folds"] = f"{_fmt(bal['fold_mean'])} ± {_fmt(bal['fold_sd'])}"
        row["patients"] = int(bal["patients"])
        if compared:
            auc = part.loc["auc"]
            row["paired patients"] = ("reference" if name == reference else
                                      paired_count_text(auc.get("paired_patients", np.nan), auc.get("unpaired_patients", 0)))
            for m in COMPARED:
                r = part.loc[m]
                row[f"Δ{SHORT[m]} [CI], p Holm"] = ("reference" if name == reference else
                                                    f"{_fmt(r.get('diff_pooled'))} [{_fmt(r.get('diff_ci_low'))}, "
                                                    f"{_fmt(r.get('diff_ci_high'))}], p={_fmt(r.get('p_holm'))}")
                row[f"Δ{SHORT[m]} folds [t CI]"] = ("reference" if name == reference else
                                                   f"{_fmt(r.get('diff_fold_mean'))} [{_fmt(r.get('diff_fold_ci_low'))}, "
                                                   f"{_fmt(r.get('diff_fold_ci_high'))}]")
        rows.append(row)
    return pd.DataFrame(rows)


def per_fold_table(runs: dict) -> pd.DataFrame:
    rows = [{"experiment": name, **fold_columns(run, r["fold"]),
             **{SHORT[m]: round(run["metrics"][r["fold"]]["patient"][m], 4) for m in SHOWN}}
            for name, run in runs.items() for r in run["results"]]
    return pd.DataFrame(rows)


def subtype_tables(runs: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Binary recall per subtype (pooled patients, 'correct/total') and the subtype head's scores."""
    recall_rows, head_rows = [], []
    for name, run in runs.items():
        patients = patient_outcomes(run["pooled"])
        row = {"experiment": name}
        for code, part in patients.groupby("subtype"):  # a patient once; its share of repeats decided right
            row[SUBTYPES[int(code)]] = f"{part['correct'].sum():.3g}/{len(part)}"
        recall_rows.append(row)
        folds = [m["patient"] for m in run["metrics"].values()]
        if all("subtype_macro_f1" in m for m in folds):
            head_rows.append({"experiment": name,
                              "subtype_macro_f1": format_mean_sd([m["subtype_macro_f1"] for m in folds]),
                              "subtype_balanced_accuracy": format_mean_sd(
                                  [m["subtype_balanced_accuracy"] for m in folds])})
    return pd.DataFrame(recall_rows), pd.DataFrame(head_rows)


def validation_threshold_table(runs: dict) -> pd.DataFrame:
    """Secondary: patient-level decisions at the threshold each fold chose on its inner
    validation patients (the primary rule is 0.5), fold mean ± sd."""
    rows = []
    for name, run in runs.items():
        scores = {m: [] for m in ("balanced_accuracy", "sensitivity", "specificity")}
        thresholds = [r.get("val_threshold") for r in run["results"]]
        if any(t is None for t in thresholds):  # trained on every training patient: nothing held out
            continue
        for threshold, frame in zip(thresholds, run["predictions"]):
            metrics = fold_metrics(frame, threshold)["patient"]
            for m in scores:
                scores[m].append(metrics[m])
        rows.append({"experiment": name, "thresholds": ", ".join(f"{t:.2f}" for t in thresholds),
                     **{SHORT[m]: format_mean_sd(v) for m, v in scores.items()}})
    return pd.DataFrame(rows)


def calibration_table(runs: dict) -> pd.DataFrame:
    """Patient level, pooled: ECE and Brier score of the raw probabilities, of those moved from
    the balanced training prior to each fold's training prevalence, and of those temperature-
    scaled on the other folds' patients (utils.report.temperature; decisions unchanged)."""
    rows = []
    for name, run in runs.items():
        units = calibrated_patients(run)
        versions = {"": units["calibrated"], "_uncorrected": units["prob"], "_temperature": cross_fitted(units)}
        row = {"experiment": name, "patients": units["patient"].nunique(), "tests": len(units)}
        for suffix, prob in versions.items():
            row[f"ece{suffix}"] = round(expected_calibration_error(units["label"], prob), 4)
            row[f"brier{suffix}"] = round(brier_score_loss(units["label"], prob), 4)
        rows.append(row)
    return pd.DataFrame(rows)


def calibrated_patients(run: dict) -> pd.DataFrame:
    """Pooled patients with their probability corrected for the training prior."""
    prevalence = {r["fold"]: r.get("train_prevalence", 0.5) for r in run["results"]}
    units = patient_probabilities(run["pooled"])
    return units.assign(calibrated=prior_corrected(units["prob"], units["fold"].map(prevalence).to_numpy()))


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


def scored_patients_table(runs: dict, folds: pd.DataFrame, cfg) -> pd.DataFrame:
    """Per experiment: the patients it scored (tested at least once) of the study's, and why the
    others were left out: no usable image at its magnifications, or a test fold not finished."""
    rows = []
    for name, run in runs.items() if len(folds) else ():  # no folds.csv: nothing to count against
        scored = set(run["pooled"]["patient"])
        finished = {r["fold"] for r in run["results"] if r.get("repeat", 0) == 0}
        unfinished = set(folds.loc[~folds["fold"].isin(finished), "patient"]) - scored
        no_image = set(folds["patient"]) - scored - unfinished
        mags = "/".join(f"{m}X" for m in experiment_config(cfg, name).magnifications)
        why = [f"{len(no_image)} without a usable {mags} image" if no_image else "",
               f"{len(unfinished)} in test folds that did not finish" if unfinished else ""]
        rows.append({"experiment": name, "magnifications": mags, "patients scored": len(scored),
                     "of": len(folds), "left out": "; ".join(w for w in why if w) or "none",
                     "left-out patients": ", ".join(sorted(no_image | unfinished))})
    return pd.DataFrame(rows)
