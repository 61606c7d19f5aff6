"""The words of the report: run header, protocol and how to read a results cell. Shared by
RUNPOD_OUTPUT.md and report.html; reads files only."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from config import MIL_EXPERIMENTS, STAIN_FIT_IMAGES
from utils.experiments import candidates, combination_text
from utils.files import DATASET_FILE, FAILED_JOBS_FILE, HEADER_FILE


def read_text_file(path: Path, default: str = "") -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else default


def header_lines(out: Path, runs: dict) -> list[str]:
    header = json.loads(read_text_file(out / HEADER_FILE, "{}"))
    dataset = json.loads(read_text_file(out / DATASET_FILE, "{}"))
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


def results_key(cfg) -> str:
    """How to read a results cell, with the run's own number of bootstrap draws."""
    return ("Cells: value of the pooled out-of-fold predictions [95 % CI]; the CI resamples slide groups "
            f"within class ({cfg.bootstrap_samples:,} draws), except patient-level accuracy, sensitivity and "
            "specificity: successes / patients with a Wilson interval at the effective number of patients of "
            "their slide groups (Korn and Graubard 1998: p(1-p) over the between-group variance, between the "
            "number of slide groups and of patients; the number of groups where p is 0 or 1). `patients`: "
            "patients scored, each once. Δ: the pooled difference from mmnet on the patients both models scored "
            "(`paired patients`; those scored by one side only are left out and counted) [paired slide-group "
            "bootstrap CI, the same draws for both models]; Δ folds: the mean of the per-fold differences "
            "[corrected t interval], which, unlike the pooled Δ, does not charge differences in calibration "
            "between folds; p: corrected resampled t-test across folds (Nadeau and Bengio 2003; the exact sign "
            "test over the outer folds when every fold shows the same difference), Holm-adjusted within each "
            "table. With repeated cross-validation every patient is tested once per repeat: a proportion's "
            "successes count each patient's share of repeats decided right, so point and interval rest on the "
            "same counts, and a patient counts once. A p above 0.05 means the data cannot tell the models "
            "apart; it does not mean they are equivalent: read the CI of Δ.")


def _selection_text(cfg) -> str:
    if cfg.model_selection == "inner_val":
        return (f"Inside each training part, {cfg.inner_val_fraction:.0%} of the slide groups of each class "
                f"form an inner validation set that picks the epoch (a secondary row shows decisions at "
                f"the threshold chosen there); the test fold picks nothing.")
    return (f"Every training patient trains for a fixed budget of {cfg.epochs} epochs and the final "
            f"weights are tested: nothing is chosen on a handful of validation patients, and nothing "
            f"on the test fold.")


def _tta_text(cfg) -> str:
    if cfg.tta == "on":
        return ("Each evaluation tuple's probability is the mean over the plain view, both mirror "
                "images and the 180-degree turn.")
    return "Evaluation uses the plain view only."


def protocol_text(cfg, runs: dict) -> str:
    """The protocol in one paragraph a reviewer can check against the code and folds.csv."""
    return (f"{_cv_text(cfg)}, StratifiedGroupKFold stratified on the 8 subtypes with the numeric "
            f"slide id as group (slide numbers shared by several patient folders stay together; no patient "
            f"and no slide number is ever on both sides of a split, checked when folds are built and when "
            f"they are loaded); seed {cfg.seed}. {_selection_text(cfg)} Training draws both classes equally "
            f"often, so decisions are at 0.5. {_tta_text(cfg)} A tuple is one image per "
            f"magnification of one patient; a patient's probability is the mean over its evaluation "
            f"tuples, which cover every image. Before a fold's model is validated, tested or kept, its "
            f"BatchNorm statistics are set to the exact mean and variance of what training fed each layer: "
            f"one epoch of the fold's training tuples as training draws them (patients mixed in every batch, "
            f"magnification dropout included, a fixed seed, no gradient), so the network tested is the network "
            f"that trained; the kept model holds them."
            f"{_dropout_text(cfg)}{_stain_text(cfg)}{_bag_text(cfg, runs)} Every experiment uses the same folds, seeds "
            f"and budget, so comparisons are paired. Models are compared at patient level only.{_nested_text(cfg)}")


def _nested_text(cfg) -> str:
    """What --select did, so the selected pipeline's row is read as the honest estimate it is."""
    if not cfg.select:
        return ""
    options = "; ".join(combination_text(o) for o in candidates(cfg).values())
    return (f" Nested selection over {len(candidates(cfg))} combinations ({options}): within each outer fold, a "
            f"{cfg.select_folds}-fold grouped cross-validation of that fold's training patients scores every "
            f"combination (patient AUC pooled over the inner test folds), the best is trained on all of the outer "
            f"fold's training patients and tested on its test fold, which no choice saw. mmnet_selected is that "
            f"pipeline, selection included; each fixed combination's own outer result is beside it.")


def _cv_text(cfg) -> str:
    """What the folds are: k-fold cross-validation, repeated r times with new fold seeds."""
    if cfg.cv_repeats > 1:
        return (f"{cfg.folds}-fold cross-validation repeated {cfg.cv_repeats} times with new fold seeds "
                f"({cfg.folds * cfg.cv_repeats} train/test jobs per experiment; every patient tested once per "
                f"repeat)")
    return f"{cfg.folds}-fold cross-validation"


def _dropout_text(cfg) -> str:
    if cfg.magnification_dropout <= 0:
        return ""
    return (f" Training masks each magnification of a tuple with probability {cfg.magnification_dropout:g} "
            f"(never all), exactly as a missing magnification is masked at test.")


def _stain_text(cfg) -> str:
    if cfg.stain_method() == "none":
        return ""
    name = {"macenko": "Macenko (stain vectors and 99th-percentile concentrations)",
            "reinhard": "Reinhard (L*a*b* means and deviations)"}[cfg.stain_method()]
    return (f" Stain normalisation: {name}, with one reference for each outer fold (and repeat), fitted on "
            f"{STAIN_FIT_IMAGES} images of that fold's training patients only (never its test patients) at the "
            f"study's magnifications ({'/'.join(f'{m}X' for m in cfg.magnifications)}) and shared by every "
            f"experiment of the fold, so comparisons are paired on stain too; kept in the fold model and applied to every "
            f"image the fold trains, validates and tests on, before augmentation (a frame with nothing to estimate, such as "
            f"an empty slot or one with under 1 % stained pixels for Macenko, passes unchanged).")


def _bag_text(cfg, runs: dict) -> str:
    """The MIL sampling, when MIL models are in the report."""
    if not any(name in MIL_EXPERIMENTS for name in runs):
        return ""
    return (f" MIL models (mil_*) read bags instead: training bags of {cfg.bag_size} images of one "
            f"patient from every magnification (distinct where the patient has that many), with as many "
            f"images per step as MMNet's tuples; at test time one bag of all of a patient's images (mil_max: "
            f"the fixed bags of {cfg.bag_size} covering every image, averaged, as a maximum grows with the "
            f"bag), so their only level is the patient.")


def failed_job_lines(out: Path) -> list[str]:
    """Jobs the Ray executor could not finish (utils.study.ray_jobs), each with why: named, so a
    table with fewer folds is never read as complete."""
    path = out / FAILED_JOBS_FILE
    why = {"worker lost": "its worker was lost {lost_workers} times", "error": "error in the job, not retried: {error}"}
    jobs = json.loads(path.read_text()) if path.is_file() else []
    return ["**Failed jobs** (rerun the same command to train them): " + ", ".join(
        f"{j['experiment']} fold {j['fold']} ({why[j['outcome']].format(**j)})" for j in jobs), ""] if jobs else []
