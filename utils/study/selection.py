"""Nested selection as ordinary jobs: every --select candidate trains on the inner folds of each
outer job (its scores) and on the outer folds (the fixed choice); after the jobs, each outer
fold's choice is the candidate with the best patient AUC pooled over its inner folds, and the
selected pipeline's outer result is that candidate's outer fold (the same training: same config,
same patients, same seeds), written under runs/mmnet_selected/.

The choice reads inner predictions only: the inner jobs of outer job j never see j's test
patients (their role there is 'outside'), so the outer estimate is honest for the pipeline with
selection.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import pandas as pd
from sklearn.metrics import roc_auc_score

from config import SELECT_BASE, SELECTED, experiment_config
from utils.experiments import SELECTION_KEY, all_inner_jobs, candidates, combination_text, inner_jobs, outer_jobs
from utils.files import atomic_write_text, model_file, run_folder
from utils.metrics import patient_probabilities

log = logging.getLogger("mmnet")


def outer_sources(cfg, names) -> dict[str, str]:
    """Candidate -> the experiment whose outer folds are its own: an experiment of the study
    with the very same training config (the candidate that is MMNet's default is mmnet), else
    the candidate itself."""
    hashes = {experiment_config(cfg, name).training_hash(): name for name in names}
    return {name: hashes.get(experiment_config(cfg, name).training_hash(), name) for name in candidates(cfg)}


def study_jobs(cfg, names) -> list[tuple[str, int]]:
    """Every (experiment, job fold) of the study: the experiments' outer folds, then each
    candidate's outer folds (where no experiment already trains them) and its inner folds."""
    order = [(name, fold) for name in names for fold in range(outer_jobs(cfg))]
    for name, source in outer_sources(cfg, names).items():
        order += [(name, fold) for fold in range(outer_jobs(cfg)) if source == name]
        order += [(name, fold) for fold in all_inner_jobs(cfg)]
    return order


def cost_line(cfg, names) -> str:
    """What the selection adds, for the run's start: trainings and the multiplier."""
    jobs = study_jobs(cfg, names)
    extra = len(jobs) - len(names) * outer_jobs(cfg)
    return (f"nested selection: {len(candidates(cfg))} combination(s) x ({outer_jobs(cfg)} outer + "
            f"{len(all_inner_jobs(cfg))} inner folds) adds {extra} fold trainings to the {len(names) * outer_jobs(cfg)} "
            f"of the experiments: x{len(jobs) / (len(names) * outer_jobs(cfg)):.1f} the study's trainings")


def inner_score(cfg, name: str, outer: int) -> dict | None:
    """Patient AUC of candidate `name` pooled over outer job `outer`'s inner test folds; None
    while one of its inner jobs is unfinished."""
    frames = []
    for fold in inner_jobs(cfg, outer):
        path = run_folder(cfg.output_dir, name, fold) / "predictions.csv"
        if not (path.parent / "results.json").is_file():
            return None
        frames.append(pd.read_csv(path, dtype={"group": str}))
    patients = patient_probabilities(pd.concat(frames, ignore_index=True))
    return {"candidate": name, "combination": combination_text(candidates(cfg)[name]),
            "auc": float(roc_auc_score(patients["label"], patients["prob"])),
            "patients": int(len(patients)), "malignant": int(patients["label"].sum())}


def best_candidate(scores: dict[str, dict], default: str | None) -> tuple[str, int]:
    """The best inner AUC and how many others tie with it; a tie keeps the defaults where they
    tie (no change without evidence), else the first listed."""
    best = max(score["auc"] for score in scores.values())
    tied = [name for name, score in scores.items() if score["auc"] >= best - 1e-12]
    return (default if default in tied else tied[0]), len(tied) - 1


def _copy_fold(cfg, source: str, outer: int) -> None:
    """The chosen candidate's outer fold as the selected pipeline's (its model linked, not copied)."""
    src, dst = run_folder(cfg.output_dir, source, outer), run_folder(cfg.output_dir, SELECTED, outer)
    shutil.rmtree(dst, ignore_errors=True)  # an earlier choice's files go (a rerun may choose again)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix in (".csv", ".json"):
            shutil.copyfile(path, dst / path.name)
    kept, link = model_file(cfg.output_dir, source, outer), model_file(cfg.output_dir, SELECTED, outer)
    if kept.is_file():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            os.link(kept, link)
        except OSError:  # another file system or no hard links: a copy
            shutil.copyfile(kept, link)


def select_outer_fold(cfg, sources: dict[str, str], outer: int) -> dict | None:
    """Choose for outer job `outer` (sources: outer_sources()) and write the selected pipeline's
    fold; None when an inner or the chosen outer job is unfinished (said in the log)."""
    scores = {name: inner_score(cfg, name, outer) for name in candidates(cfg)}
    if any(score is None for score in scores.values()):
        log.warning("selection for outer job %d: inner jobs unfinished; no selected result for it", outer)
        return None
    chosen, tied = best_candidate(scores, next((name for name, source in sources.items() if source == SELECT_BASE), None))
    source = sources[chosen]
    results_path = run_folder(cfg.output_dir, source, outer) / "results.json"
    if not results_path.is_file():
        log.warning("selection for outer job %d chose %s, whose outer fold is unfinished", outer, chosen)
        return None
    _copy_fold(cfg, source, outer)
    choice = {"candidate": chosen, "overrides": candidates(cfg)[chosen], "trained_as": source,
              "tied": tied,
              "inner_folds": cfg.select_folds, "scores": list(scores.values())}
    results = {**json.loads(results_path.read_text()), "experiment": SELECTED, SELECTION_KEY: choice}
    atomic_write_text(run_folder(cfg.output_dir, SELECTED, outer) / "results.json", json.dumps(results, indent=2))
    log.info("selection for outer job %d: %s (inner patient AUC: %s)", outer, combination_text(choice["overrides"]),
             "; ".join(f"{s['combination']} {s['auc']:.3f}" for s in choice["scores"]))
    return choice


def write_selection(cfg, names) -> int:
    """Every outer job's choice; returns how many outer jobs have a selected result."""
    if not cfg.select:
        return 0
    if SELECT_BASE not in names:
        raise ValueError(f"--select compares with {SELECT_BASE}, which is not among the experiments")
    sources = outer_sources(cfg, names)
    return sum(select_outer_fold(cfg, sources, outer) is not None for outer in range(outer_jobs(cfg)))
