"""Tables, plots, RUNPOD_OUTPUT.md and report.html, rebuilt from output/ alone (also by
--report-only, and live during a run by `python -m utils.report OUT`).
Reads files only: never imports torch or a model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import pandas as pd

from config import ABLATIONS, BASELINES, EXPERIMENTS, FUSION_EXPERIMENTS, MIL_EXPERIMENTS, parse_args
from utils.env import PROJECT_ROOT, get_base_path
from utils.files import (
    GRADCAM_DIR,
    PROGRESS_FILE,
    REPORT_FILE,
    RUN_LOG,
    atomic_write_text,
    markdown_table,
    save_table,
    setup_logging,
)
from utils.report import plottings
from utils.report.conformal import CONFORMAL_ALPHAS, DECISION_FILE, conformal_table, write_decision_calibration
from utils.report.gradcam_figures import gradcam_figures
from utils.report.html_report import write_html_report
from utils.report.report_text import failed_job_lines, header_lines, protocol_text, read_text_file, results_key
from utils.report.selection import selection_entries, selection_family, selection_names, selection_plot
from utils.report.tables import (
    calibrated_patients,
    calibration_table,
    comparison_table,
    family_rows,
    fold_table,
    load_runs,
    per_fold_table,
    scored_patients_table,
    statistics,
    subtype_tables,
    timing_table,
    validation_threshold_table,
)
from utils.report.tracking import attach_report, track_study
from utils.report.weights import fusion_weights, hierarchy_attention, magnification_importance, magnification_weights

log = logging.getLogger("mmnet")


def _comparison_values(stats: pd.DataFrame, family: str, level: str) -> pd.DataFrame:
    """The numbers behind a formatted comparison table (the same rows of statistics.csv)."""
    return family_rows(stats, _with_reference(family), level, family).round(5)


# Families of the paired comparison with MMNet, one results table each (Holm within a family).
FAMILIES = {"main": BASELINES, "ablation": ABLATIONS, "fusion": FUSION_EXPERIMENTS, "mil": MIL_EXPERIMENTS}
GROUP_TITLES = {"fusion": "Fusion strategies (patient level; MMNet's own is 'weighted')",
                "mil": "MIL aggregators over all of a patient's images (patient level; a bag is a patient, "
                       "so there is no per-sample level)"}


# (file, family, level) of every comparison table with MMNet, whose numbers go to <file>_values.csv
COMPARISON_FILES = (("main_comparison", "main", "patient"), ("main_comparison_tuple", "main", "tuple"),
                    ("ablation", "ablation", "patient"), ("fusion_comparison", "fusion", "patient"),
                    ("mil_comparison", "mil", "patient"))


def _with_reference(family: str) -> list[str]:
    return ["mmnet", *FAMILIES[family]]


def own_members(family: str) -> list[str]:
    """A family's experiments that belong to no other family (the fusion group reuses the
    ablation mmnet_no_fusion for its mean strategy: that one is the ablations' own)."""
    others = {name for other, names in FAMILIES.items() if other != family for name in names}
    return [name for name in FAMILIES[family] if name not in others]


def _group_entries(stats: pd.DataFrame, runs: dict) -> list[tuple]:
    """A comparison table per experiment group one of whose own members has finished folds
    (a default run, whose ablations include mmnet_no_fusion, has no fusion section)."""
    return [(title, f"{family}_comparison", comparison_table(stats, _with_reference(family), "patient", family), True)
            for family, title in GROUP_TITLES.items() if any(name in runs for name in own_members(family))]


def write_tables(runs: dict, cfg, tables: Path) -> dict:
    """Every results table under tables/ (CSV, Markdown, booktabs LaTeX where a paper would
    use it); returns the ones the report shows, by title."""
    stats = statistics(runs, cfg.bootstrap_samples, cfg.seed, {**FAMILIES, **selection_family(cfg)})
    stats.round(5).to_csv(tables / "statistics.csv", index=False)
    main, ablation = _with_reference("main"), _with_reference("ablation")
    for file, family, level in COMPARISON_FILES:
        _comparison_values(stats, family, level).to_csv(tables / f"{file}_values.csv", index=False)
    recall, head = subtype_tables(runs)
    entries = [  # (title, file, table, LaTeX too)
        ("Main comparison (patient level)", "main_comparison", comparison_table(stats, main, "patient", "main"), True),
        ("Per-sample level (a tuple of 4 images for MMNet, 1 image for single-magnification models: not compared)",
         "main_comparison_tuple", comparison_table(stats, main, "tuple"), True),
        ("Ablations (patient level)", "ablation", comparison_table(stats, ablation, "patient", "ablation"), True),
        *_group_entries(stats, runs), *selection_entries(stats, runs, cfg),
        ("Patients scored per experiment (and why the others were left out)", "scored_patients",
         scored_patients_table(runs, _folds_table(tables.parent), cfg), False),
        ("Per fold (patient level)", "per_fold", per_fold_table(runs), True),
        ("Per-subtype recall of the binary decision (patients correct/total)", "subtype_recall", recall, True),
        ("Subtype head (patient level, fold mean ± sd)", "subtype_head", head, True)]
    if "mmnet" in runs:
        entries += [("MMNet magnification importance: drop in patient AUC with that magnification masked out",
                     "magnification_importance", magnification_importance(runs["mmnet"]), True),
                    ("MMNet fusion weights (after hierarchical attention; how the fused vector is formed, not a "
                     "contribution)", "fusion_weights", fusion_weights(runs["mmnet"]), False),
                    ("MMNet hierarchical attention: each magnification's weight on the levels below it (where present) "
                     "and on itself, test tuples, fold mean ± sd", "hierarchy_attention", hierarchy_attention(runs["mmnet"]),
                     False)]
    weights = magnification_weights(runs)
    if len(weights) > 1 or (len(weights) and "mmnet" not in runs):
        entries.append(("Magnification weights of every model that forms a weighted sum (test samples, fold mean; "
                        "MIL: the share of attention on each magnification's images)", "magnification_weights",
                        weights, False))
    secondary = validation_threshold_table(runs)
    if len(secondary):  # only runs that held inner-validation patients out (--model-selection inner_val)
        entries.append(("Secondary: decisions at the validation-chosen threshold (patient level, fold mean ± sd)",
                        "validation_threshold", secondary, False))
    alphas = sorted({*CONFORMAL_ALPHAS, cfg.conformal_alpha})
    write_decision_calibration(runs, tables.parent / DECISION_FILE, cfg.conformal_alpha)  # for predict.py
    entries.append(("Conformal prediction sets (patient level; each outer fold calibrated on the other folds' "
                    "patients; referred = both labels or none)", "conformal",
                    conformal_table(runs, main, alphas, cfg.bootstrap_samples, cfg.seed), False))
    entries += [("Calibration (patient level): ece/brier of the probabilities corrected for the balanced training prior, "
                 "_uncorrected of the raw ones, _temperature of the ones scaled with the other folds' temperature",
                 "calibration",
                 calibration_table(runs), False),
                ("Time per experiment", "timing", timing_table(runs), False)]
    for name, run in runs.items():
        save_table(fold_table(run), tables, f"{name}_folds")
    shown = {}
    for title, file, table, latex in entries:
        save_table(table, tables, file, latex=latex, caption=title)
        shown[title] = table
    shown["_stats"] = stats
    return shown


def _folds_table(out: Path) -> pd.DataFrame:
    """folds.csv of the run (an output folder put together from runs/ alone has none)."""
    path = out / "folds.csv"
    return pd.read_csv(path, dtype={"group": str}) if path.is_file() else pd.DataFrame(columns=["patient", "fold"])


def reference_experiment(cfg, runs: dict) -> str:
    """The experiment whose curves are drawn: MMNet, or the first one the run asked for."""
    if "mmnet" in runs:
        return "mmnet"
    return next((name for name in cfg.experiments if name in runs), next(iter(runs)))


def write_plots(runs: dict, stats, out: Path, reference: str) -> list[tuple[Path, str]]:
    """Every results figure with a one-line caption of what it shows; the curves are the
    reference experiment's (the others are in the tables)."""
    plots, figures = out / "plots", []
    figures.append((plottings.confusion_matrices(runs, plots / "confusion_matrices.png"),
                    "Patient-level confusion matrices of every experiment: pooled out-of-fold predictions, "
                    "decision at probability 0.5."))
    figures.append((plottings.experiment_bars(stats, plots / "experiments_bar.png"),
                    "Pooled patient-level balanced accuracy and AUC of every experiment, with 95 % slide-group "
                    "bootstrap intervals."))
    figures.append((plottings.fold_metrics_plot(per_fold_table(runs), plottings.bar_rows(stats, "patient", "auc"),
                                                plots / "fold_auc.png"),
                    "Patient AUC of every test fold (dots, with a box per experiment) and the pooled out-of-fold "
                    "AUC of the tables (diamond)."))
    compared = [reference] + [n for n in BASELINES if n in runs and n != reference]
    figures.append((plottings.pooled_roc(runs, compared, plots / "roc_pooled.png"),
                    "Pooled out-of-fold patient ROC curves of the compared models with 95 % slide-group bootstrap "
                    "bands (each patient once, averaged over repeats); the legend gives the patients counted."))
    figures.append((plottings.referral_plot(runs, compared, plots / "conformal_referral.png"),
                    "Share of patients referred (conformal set of both labels, or none) against the per-class "
                    "error rate alpha; each outer fold calibrated on the other folds' patients."))
    run, name, title = runs[reference], reference, plottings.title_of(reference)
    figures += [
        (plottings.roc_curves(run, name, plots / f"roc_{name}.png"),
         f"{title} ROC curve of each test fold (patient level) with their mean and a ±1 sd band."),
        (plottings.training_curves(run, name, plots / f"training_curves_{name}.png"),
         f"{title} training per fold: binary loss (dashed: the same loss on inner-validation patients, "
         "when held out), subtype loss, and inner-validation AUC when held out."),
        (plottings.calibration_plot(calibrated_patients(run), name, plots / f"calibration_{name}.png"),
         f"{title} reliability diagram (patient level, pooled), probabilities moved from the balanced "
         "training prior to each fold's prevalence."),
        (plottings.magnification_importance_plot(magnification_importance(run), name,
                                                 plots / f"magnification_importance_{name}.png"),
         f"Drop in {title}'s patient AUC when one magnification is masked out of every test tuple.")]
    figures.append((selection_plot(runs, plots / "selection.png"), "Nested selection: each combination's inner patient AUC "
                    "in every outer fold (pooled over its inner folds); the ring marks the one chosen and tested."))
    figures = [(path, caption) for path, caption in figures if path is not None]  # nothing to draw
    for path in gradcam_figures(out / GRADCAM_DIR, plots / "gradcam"):
        if path.stem.startswith("mil_"):
            figures.append((path, f"MIL: the most-attended images of test patient case '{path.stem}' with the "
                                  f"Grad-CAM of the patient's decision on each (colour bar: 0 to 1)."))
            continue
        figures.append((path, f"Grad-CAM of the predicted class and spatial attention, one tuple of test "
                              f"patient case '{path.stem}' (colour bars give the scale; 0 to 1 for both)."))
    return figures


def dataset_figures(out: Path) -> list[tuple[Path, str]]:
    """The figures of the dataset analysis (written before training)."""
    captions = {"class_magnification_bars": "Images per class and magnification.",
                "subtype_distribution": "Patients per subtype, benign and malignant.",
                "patient_magnification_heatmap": "Images of each patient at each magnification.",
                "sample_grid": "One image per subtype and magnification (the data as indexed)."}
    return [(out / "plots" / f"{stem}.png", text) for stem, text in captions.items()
            if (out / "plots" / f"{stem}.png").is_file()]


def _markdown_lines(cfg, runs: dict, shown: dict, figures: list, base: Path) -> list[str]:
    """The report as Markdown lines; figure links are relative to `base` (where the file lies)."""
    out = Path(cfg.output_dir)
    lines = header_lines(out, runs)
    lines += ["## Dataset", "", read_text_file(out / "tables" / "class_by_magnification.md", "(no analysis)"), ""]
    lines += ["## Protocol", "", protocol_text(cfg, runs), "", "## Results", "", results_key(cfg), ""]
    lines += failed_job_lines(out)
    for title, table in shown.items():
        if not title.startswith("_") and len(table):
            lines += [f"### {title}", "", markdown_table(table), "", *([table.attrs["reading"], ""] if "reading" in table.attrs else [])]
    benchmark = out / "tables" / "benchmark.csv"
    if benchmark.is_file():  # written by `python -m utils.benchmark --output-dir` this folder
        lines += ["### Benchmark (python -m utils.benchmark)", "", markdown_table(pd.read_csv(benchmark)), ""]
    reference = reference_experiment(cfg, runs)
    lines += ["## Figures", "", f"ROC, calibration and training curves are drawn for {plottings.title_of(reference)} "
              f"(`{reference}`), the reference experiment of this run.", ""]
    lines += [f"![{caption}]({os.path.relpath(path, base)})  \n{caption}\n" for path, caption in figures]
    lines += ["## Log", "", "```text", read_text_file(out / RUN_LOG).rstrip(), "```", ""]
    return lines


def report_paths(cfg) -> list[Path]:
    """<output_dir>/RUNPOD_OUTPUT.md always; also --report-file when given, and the repository
    root for a full run into the default output folder (where users look for it). A dry run
    writes to its own folder and never replaces a full run's report."""
    out = Path(cfg.output_dir)
    paths = [out / REPORT_FILE]
    if cfg.report_file:
        paths.append(Path(cfg.report_file))
    elif not cfg.dry_run and out.resolve() == (get_base_path() / "output").resolve():
        paths.append(PROJECT_ROOT / REPORT_FILE)
    return list(dict.fromkeys(p.resolve() for p in paths))


def write_markdown(cfg, runs: dict, shown: dict, figures: list) -> list[Path]:
    written = []
    for path in report_paths(cfg):
        lines = _markdown_lines(cfg, runs, shown, figures, path.parent)
        written.append(atomic_write_text(path, "\n".join(lines)))
    return written


def _console(table: pd.DataFrame) -> str:
    """The comparison for a terminal: experiment, balanced accuracy and AUC with CIs, Δ AUC."""
    keep = [c for c in table.columns if c == "experiment" or c.startswith(("bal_acc ", "auc", "Δauc", "ΔAUC"))
            or c in ("bal_acc", "AUC", "auc")]
    return markdown_table(table[keep] if len(keep) > 1 else table)


def write_report(cfg, live: bool = False) -> int:
    """Tables, plots, RUNPOD_OUTPUT.md and report.html from output/. live: report.html only,
    cheaper intervals, while the run goes on (rewritten after folds, at most once a minute)."""
    out = Path(cfg.output_dir)
    runs = load_runs(out, [*EXPERIMENTS, *selection_names(cfg)])
    if not runs:
        if live:
            write_html_report(cfg, runs, {}, [], live)
            return 0
        log.error("no finished folds under %s/runs: run `python main.py` first", out)
        return 2
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    if live:
        cfg = dataclasses.replace(cfg, bootstrap_samples=min(cfg.bootstrap_samples, 200))
    shown = write_tables(runs, cfg, tables)
    reference = reference_experiment(cfg, runs)
    figures = write_plots(runs, shown["_stats"], out, reference) + dataset_figures(out)
    html_path = write_html_report(cfg, runs, shown, figures, live)
    if live:
        return 0
    log.info("main comparison (patient level; all columns in the report):\n%s",
             _console(shown["Main comparison (patient level)"]))
    for title in ["Ablations (patient level)", *GROUP_TITLES.values()]:
        if title in shown and len(shown[title]) > 1:
            log.info("%s:\n%s", title.split(" (")[0].lower(), _console(shown[title]))
    # Logged before the Markdown is written, so the report's log section is the whole run log
    # and a --report-only rebuild (which logs elsewhere) reproduces it exactly.
    log.info("report: %s and %s (tables in %s, plots in %s)", ", ".join(map(str, report_paths(cfg))),
             html_path, tables, out / "plots")
    tracked = track_study(cfg, runs, shown["_stats"]) if cfg.tracking == "mlflow" else None
    write_markdown(cfg, runs, shown, figures)
    if tracked:
        attach_report(cfg, tracked)  # the Markdown exists only now; nothing more is logged
    mark_finished(out)
    return 0


def mark_finished(out: Path) -> None:
    """progress.json says 'finished' once the final report exists (a live page stops reloading)."""
    path = out / PROGRESS_FILE
    info = json.loads(read_text_file(path, "{}"))
    if info.get("state") in ("reporting", "running"):
        info["state"] = "finished"
        atomic_write_text(path, json.dumps(info, indent=2))


def main(argv=None) -> int:
    """python -m utils.report OUTPUT_DIR: the live report.html of a run in progress (started by
    main.py after folds (at most once a minute), in its own process, so training never waits for it)."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    cfg = parse_args(["--report-only", "--output-dir", args.output_dir])
    setup_logging(None, level=logging.WARNING)
    return write_report(cfg, live=True)


if __name__ == "__main__":
    raise SystemExit(main())
