"""--backbones a,b,c: one row per encoder, every encoder trained on the same folds.

Patient balanced accuracy and AUC with slide-group bootstrap intervals, the paired difference
to the first encoder (the same patients on the same bootstrap draws), training minutes and the
size of the encoder's feature cache; written to tables/encoders.csv and .md and as a section
of the encoder study's RUNPOD_OUTPUT.md. Reads output/ files only.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from utils.files import FEATURE_CACHE_FILE, REPORT_FILE, atomic_write_text, encoder_dir, markdown_table
from utils.report.paired import on_common_patients, paired_count_text
from utils.report.statistics import bootstrap_ci, paired_difference_ci
from utils.report.tables import load_runs

COMPARED = ("balanced_accuracy", "auc")


def headline_experiment(experiments) -> str:
    """The experiment the encoders are ranked on: MMNet when it ran, else the first."""
    return "mmnet" if "mmnet" in experiments else experiments[0]


def _cache_gb(folder: Path) -> float | None:
    path = folder / FEATURE_CACHE_FILE
    return round(json.loads(path.read_text())["bytes"] / 1e9, 3) if path.is_file() else None


def _row(backbone: str, run: dict, first: dict | None, n_boot: int, seed: int, folder: Path) -> dict:
    ci = bootstrap_ci(run["pooled"], "patient", n_boot=n_boot, seed=seed)
    row = {"encoder": backbone, "patients": run["pooled"]["patient"].nunique()}
    for metric in COMPARED:
        row.update({metric: ci[metric][0], f"{metric}_ci_low": ci[metric][1], f"{metric}_ci_high": ci[metric][2]})
    if first is not None:  # on the patient tests both encoders scored
        mine, theirs, counts = on_common_patients(run["pooled"], first["pooled"])
        row.update(counts)
        diffs = paired_difference_ci(mine, theirs, COMPARED, n_boot, seed)
        for metric, (diff, low, high) in diffs.items():
            row.update({f"d_{metric}": diff, f"d_{metric}_ci_low": low, f"d_{metric}_ci_high": high})
    row["train_minutes"] = round(sum(r["train_seconds"] for r in run["results"]) / 60, 2)
    row["feature_cache_gb"] = _cache_gb(folder)
    return row


def encoder_table(output_dir, backbones, experiments, n_boot: int, seed: int) -> pd.DataFrame:
    experiment = headline_experiment(list(experiments))
    runs = {b: load_runs(encoder_dir(output_dir, b), [experiment]).get(experiment) for b in backbones}
    first = runs[backbones[0]]
    rows = [_row(b, run, first if b != backbones[0] else None, n_boot, seed, encoder_dir(output_dir, b))
            for b, run in runs.items() if run is not None]
    return pd.DataFrame(rows).assign(experiment=experiment)


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    def interval(row, metric, prefix=""):
        value = row.get(f"{prefix}{metric}")
        if pd.isna(value):
            return "reference"
        return f"{value:.3f} [{row[f'{prefix}{metric}_ci_low']:.3f}, {row[f'{prefix}{metric}_ci_high']:.3f}]"
    return pd.DataFrame({"encoder": table["encoder"], "patients": table["patients"],
                         "bal_acc [CI]": [interval(r, "balanced_accuracy") for _, r in table.iterrows()],
                         "auc [CI]": [interval(r, "auc") for _, r in table.iterrows()],
                         "Δauc vs first [CI]": [interval(r, "auc", "d_") for _, r in table.iterrows()],
                         "paired patients": [paired_count_text(r.get("paired_patients", float("nan")),
                                                               r.get("unpaired_patients", 0)) if "paired_patients" in r
                                             and pd.notna(r.get("paired_patients")) else "reference"
                                             for _, r in table.iterrows()],
                         "train min": table["train_minutes"], "cache GB": table["feature_cache_gb"]})


def write_encoder_report(cfg) -> Path:
    """tables/encoders.csv, .md and the encoder study's RUNPOD_OUTPUT.md."""
    out = Path(cfg.output_dir)
    table = encoder_table(out, list(cfg.backbones), list(cfg.experiments), cfg.bootstrap_samples, cfg.seed)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tables" / "encoders.csv", index=False)
    shown = markdown_table(_shown(table)) if len(table) else "(no encoder finished a fold)"
    atomic_write_text(out / "tables" / "encoders.md", shown)
    experiment = headline_experiment(list(cfg.experiments))
    lines = ["# Encoders on the same folds", "",
             f"Patient level, experiment `{experiment}`; every encoder was trained and tested on the same "
             f"folds (folds.csv of the first encoder, copied to the others). Intervals: 95 % slide-group "
             f"bootstrap ({cfg.bootstrap_samples} draws); Δ: the paired difference to the first encoder "
             f"({cfg.backbones[0]}) on the same patients and draws.", "", shown, "",
             "Each encoder's full report: " + ", ".join(
                 f"[{b}]({encoder_dir(out, b).relative_to(out) / REPORT_FILE})" for b in cfg.backbones), ""]
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines))
