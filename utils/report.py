"""Tables, plots and RUNPOD_OUTPUT.md, rebuilt from output/ alone (also by --report-only).
Reads files only: never imports torch or a model."""
from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

import pandas as pd

from config import ABLATIONS, BASELINES, EXPERIMENTS
from utils import plottings
from utils.files import DATASET_FILE, GRADCAM_DIR, HEADER_FILE, RUN_LOG, markdown_table, save_table
from utils.tables import (calibrated_patients, calibration_table, comparison_table, fold_table, fusion_weights,
                          load_runs, magnification_importance, per_fold_table, statistics, subtype_tables,
                          timing_table, validation_threshold_table)

log = logging.getLogger("mmnet")


def write_tables(runs: dict, cfg, tables: Path) -> dict:
    """Every results table under tables/; returns the ones the report shows."""
    stats = statistics(runs, cfg.bootstrap_samples, cfg.seed, {"main": BASELINES, "ablation": ABLATIONS})
    stats.round(5).to_csv(tables / "statistics.csv", index=False)
    shown = {
        "Main comparison (patient level)": comparison_table(stats, ["mmnet", *BASELINES], "patient"),
        "Per-sample level (a tuple of 4 images for MMNet, 1 image for single-magnification models: not compared)":
            comparison_table(stats, ["mmnet", *BASELINES], "tuple"),
        "Ablations (patient level)": comparison_table(stats, ["mmnet", *ABLATIONS], "patient"),
    }
    files = ("main_comparison", "main_comparison_tuple", "ablation")
    for file, table in zip(files, shown.values()):
        save_table(table, tables, file, latex=True)
    for name, run in runs.items():
        save_table(fold_table(run), tables, f"{name}_folds")
    shown["Per fold (patient level)"] = per_fold_table(runs)
    save_table(shown["Per fold (patient level)"], tables, "per_fold", latex=True)
    recall, head = subtype_tables(runs)
    shown["Per-subtype recall of the binary decision (patients correct/total)"] = recall
    shown["Subtype head (patient level, fold mean ± sd)"] = head
    save_table(recall, tables, "subtype_recall", latex=True)
    save_table(head, tables, "subtype_head", latex=True)
    if "mmnet" in runs:
        shown["MMNet magnification importance: drop in patient AUC with that magnification masked out"] = \
            magnification_importance(runs["mmnet"])
        save_table(magnification_importance(runs["mmnet"]), tables, "magnification_importance", latex=True)
        shown["MMNet fusion weights (after hierarchical attention; how the fused vector is formed, not a contribution)"] = \
            fusion_weights(runs["mmnet"])
        save_table(fusion_weights(runs["mmnet"]), tables, "fusion_weights")
    shown["Secondary: decisions at the validation-chosen threshold (patient level, fold mean ± sd)"] = \
        validation_threshold_table(runs)
    save_table(validation_threshold_table(runs), tables, "validation_threshold")
    shown["Calibration (patient level, corrected for the balanced training prior)"] = calibration_table(runs)
    save_table(shown["Calibration (patient level, corrected for the balanced training prior)"], tables, "calibration")
    shown["Time per experiment"] = timing_table(runs)
    save_table(shown["Time per experiment"], tables, "timing")
    shown["_stats"] = stats
    return shown


def write_plots(runs: dict, stats, out: Path) -> None:
    plots = out / "plots"
    plottings.confusion_matrices(runs, plots / "confusion_matrices.png")
    plottings.experiment_bars(stats, plots / "experiments_bar.png")
    if "mmnet" in runs:  # the curves of the proposed model; the others are in the tables
        run = runs["mmnet"]
        plottings.roc_curves(run, "mmnet", plots / "roc_mmnet.png")
        plottings.training_curves(run, "mmnet", plots / "training_curves_mmnet.png")
        plottings.calibration_plot(calibrated_patients(run), "mmnet", plots / "calibration_mmnet.png")
        plottings.magnification_importance_plot(magnification_importance(run), "mmnet",
                                                plots / "magnification_importance_mmnet.png")
    plottings.gradcam_figures(out / GRADCAM_DIR, plots / "gradcam")


def _read(path: Path, default: str = "") -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else default


def _header(out: Path, runs: dict) -> list[str]:
    header = json.loads(_read(out / HEADER_FILE, "{}"))
    dataset = json.loads(_read(out / DATASET_FILE, "{}"))
    pretrained = sorted({r.get("pretrained", "") for run in runs.values() for r in run["results"]})
    lines = ["# MMNet-BreakHis run report", "",
             f"- report written: {datetime.now().isoformat(timespec='seconds')}",
             f"- run started: {header.get('started', 'unknown')}, commit `{header.get('commit', 'unknown')}`",
             f"- device: {header.get('env', {}).get('device', '?')} ({header.get('env', {}).get('device_name', '?')}), "
             f"AMP {header.get('env', {}).get('amp_dtype', '?')}, batch {header.get('env', {}).get('batch_size', '?')}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in header.get('versions', {}).items())}",
             f"- backbone weights: {', '.join(pretrained) or 'n/a'}",
             f"- determinism: {header.get('determinism', 'unknown')}",
             f"- data: {dataset.get('data_dir', '?')}: {dataset.get('images', '?')} images, "
             f"{dataset.get('patients', '?')} patients, {dataset.get('issues', '?')} data issue(s)"]
    if dataset.get("demo"):
        lines.append("- **SYNTHETIC DEMO DATA: these numbers say nothing about BreakHis.**")
    lines += [f"- warning: {w}" for w in header.get("warnings", [])]
    lines += ["", "<details><summary>Resolved configuration</summary>", "", "```json",
              json.dumps(header.get("config", {}), indent=1), "```", "</details>", ""]
    return lines


RESULTS_KEY = (
    "Cells: value of the pooled out-of-fold predictions [95 % CI]; the CI resamples slide groups "
    "within class (2,000 draws by default), except patient-level accuracy, sensitivity and "
    "specificity, which use the Wilson interval. `bal_acc folds`: fold mean ± sd. Δ: the pooled "
    "difference from mmnet [paired slide-group bootstrap CI, the same draws for both models]; p: "
    "corrected resampled t-test across folds (Nadeau and Bengio 2003; the exact sign test when every "
    "fold shows the same difference), Holm-adjusted within each table. A p above 0.05 means the "
    "data cannot tell the models apart; it does not mean they are equivalent: read the CI of Δ.")


def protocol_text(cfg, runs: dict) -> str:
    """The protocol in one paragraph a reviewer can check against the code and folds.csv."""
    folds = max((len(run["results"]) for run in runs.values()), default=cfg.folds)
    return (f"{folds}-fold cross-validation, StratifiedGroupKFold stratified on the 8 subtypes with the numeric "
            f"slide id as group (slide numbers shared by several patient folders stay together; no patient "
            f"and no slide number is ever on both sides of a split, checked when folds are built and when "
            f"they are loaded); seed {cfg.seed}. Inside each training part, {cfg.inner_val_fraction:.0%} of "
            f"the slide groups of each class form an inner validation set that picks the epoch; the test "
            f"fold picks nothing. Training draws both classes equally often, so decisions are at 0.5; the "
            f"threshold chosen on inner validation is a secondary row. A tuple is one image per "
            f"magnification of one patient; a patient's probability is the mean over its evaluation "
            f"tuples, which cover every image. Every experiment uses the same folds, seeds and budget, "
            f"so comparisons are paired. Models are compared at patient level only.")


def write_markdown(cfg, runs: dict, shown: dict) -> Path:
    out = Path(cfg.output_dir)
    lines = _header(out, runs)
    lines += ["## Dataset", "", _read(out / "tables" / "class_by_magnification.md", "(no analysis)"), ""]
    lines += ["## Protocol", "", protocol_text(cfg, runs), "", "## Results", "", RESULTS_KEY, ""]
    for title, table in shown.items():
        if not title.startswith("_") and len(table):
            lines += [f"### {title}", "", markdown_table(table), ""]
    benchmark = out / "tables" / "benchmark.csv"
    if benchmark.is_file():  # written by `python -m utils.benchmark --output-dir` this folder
        lines += ["### Benchmark (python -m utils.benchmark)", "", markdown_table(pd.read_csv(benchmark)), ""]
    lines += ["## Log", "", "```text", _read(out / RUN_LOG).rstrip(), "```", ""]
    path = Path(cfg.report_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_report(cfg) -> int:
    out = Path(cfg.output_dir)
    runs = load_runs(out, EXPERIMENTS)
    if not runs:
        log.error("no finished folds under %s/runs: run `python main.py` first", out)
        return 2
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    shown = write_tables(runs, cfg, tables)
    write_plots(runs, shown["_stats"], out)
    log.info("main comparison (patient level):\n%s", markdown_table(shown["Main comparison (patient level)"]))
    if len(shown["Ablations (patient level)"]) > 1:
        log.info("ablations (patient level):\n%s", markdown_table(shown["Ablations (patient level)"]))
    path = write_markdown(cfg, runs, shown)
    log.info("report written to %s (tables in %s, plots in %s)", path, tables, out / "plots")
    return 0
