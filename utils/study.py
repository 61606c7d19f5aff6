"""Every selected experiment x fold on one cache and one set of folds: in turn, or spread over
worker processes (one per GPU). The report is written afterwards, from output/ alone."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from config import EXPERIMENTS, ConfigError, experiment_config
from utils.benchmark import predict_duration
from utils.checkpoint import ForeignRunError
from utils.device import EnvInfo, empty_cache, is_out_of_memory
from utils.files import RUN_LOG
from utils.fold import run_fold
from utils.helpers import StopRequested, install_stop_handlers, stop_requested
from utils.parallel import default_jobs, run_jobs
from utils.pipeline import Study, attach_images
from utils.train import TrainingError

log = logging.getLogger("mmnet")


def selected_experiments(cfg) -> list[str]:
    return list(cfg.experiments) or list(EXPERIMENTS)


def run_experiment(cfg, study: Study, name: str) -> list[dict]:
    """Every fold of one experiment; a failed fold is logged and the others go on."""
    exp_cfg = experiment_config(cfg, name)
    results = []
    for fold in range(cfg.folds * cfg.cv_repeats):
        if stop_requested():
            raise StopRequested(f"{stop_requested()} before {name} fold {fold}")
        try:
            results.append(run_fold(exp_cfg, study, name, fold))
        except ForeignRunError as exc:  # a whole-study decision, not one fold's failure
            raise ConfigError(str(exc)) from None
        except TrainingError as exc:  # one bad fold must not cost the rest of the study
            log.error("%s fold %d FAILED: %s", name, fold, exc)
    return results


def run_sequential(cfg, study: Study, names: list[str]) -> int:
    """Experiments one after the other in this process; returns the number of failed folds."""
    failed = 0
    for name in names:
        started = time.perf_counter()
        results = run_experiment(cfg, study, name)
        jobs = cfg.folds * cfg.cv_repeats
        failed += jobs - len(results)
        log.info("experiment %s: %d/%d folds in %.1f s", name, len(results), jobs, time.perf_counter() - started)
    return failed


def run_study(cfg, prepared: Study, env: EnvInfo) -> tuple[Study, int]:
    """Train every selected experiment x fold; returns the study with its images attached
    and the number of failed folds."""
    install_stop_handlers()  # from here on SIGTERM/SIGINT stop after the current step, saved
    study = attach_images(cfg, prepared, env)
    names = selected_experiments(cfg)
    jobs = cfg.jobs or default_jobs(study.env.device)
    try:
        predicted = predict_duration(cfg, study, names)
    except RuntimeError as exc:  # the loop has its own back-off; is_out_of_memory() tells OOM apart
        if not is_out_of_memory(exc):
            raise
        log.warning("could not measure the speed for a duration estimate (out of memory at micro-batch %d); "
                    "training goes on and backs off by itself", study.env.micro_batch)
        empty_cache(study.env.device)
        predicted = float("nan")
    started = time.perf_counter()
    if jobs > 1:
        log.info("running %d experiment x fold jobs on %d parallel workers (about %.1f min)",
                 len(names) * cfg.folds, jobs, predicted / 60 / jobs)
        failed = run_jobs(cfg, prepared, names, jobs, str(Path(cfg.output_dir) / RUN_LOG))
    else:
        failed = run_sequential(cfg, study, names)
    log.info("study: %d experiment(s) x %d folds in %.1f s", len(names), cfg.folds, time.perf_counter() - started)
    return study, failed
