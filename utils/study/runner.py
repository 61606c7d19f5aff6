"""Every selected experiment x fold on one cache and one set of folds: in turn, or spread over
worker processes (one per GPU). The report is written afterwards, from output/ alone."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path

from backbones import hold_frozen_encoders
from config import EXPERIMENTS, ConfigError, experiment_config
from preprocess.dataset import left_out_patients
from preprocess.prepared import Study, attach_images
from utils.device import EnvInfo, empty_cache, is_out_of_memory
from utils.engine.checkpoint import ForeignRunError
from utils.engine.features import attach_features
from utils.engine.fold import is_finished, run_fold
from utils.engine.stain_reference import fit_study_references
from utils.engine.stop import StopRequested, install_stop_handlers, stop_requested
from utils.engine.train import TrainingError
from utils.files import RUN_LOG
from utils.study.benchmark import predict_duration
from utils.study.parallel import run_jobs, study_job_count
from utils.study.progress import StudyProgress
from utils.study.ray_jobs import run_ray_jobs
from utils.study.selection import cost_line, study_jobs, write_selection

log = logging.getLogger("mmnet")


def selected_experiments(cfg) -> list[str]:
    return list(cfg.experiments) or list(EXPERIMENTS)


def run_sequential(cfg, study: Study, order: list[tuple[str, int]], tracker: StudyProgress) -> int:
    """The jobs one after the other in this process; a failed fold is logged and the others go
    on. Returns the number of failed folds."""
    failed, started = 0, time.perf_counter()
    last_job = {name: (name, fold) for name, fold in order}  # each experiment's last job in the order
    for name, fold in order:
        if stop_requested():
            raise StopRequested(f"{stop_requested()} before {name} fold {fold}")
        try:
            run_fold(experiment_config(cfg, name), study, name, fold, tracker)
        except ForeignRunError as exc:  # a whole-study decision, not one fold's failure
            raise ConfigError(str(exc)) from None
        except TrainingError as exc:  # one bad fold must not cost the rest of the study
            log.error("%s fold %d FAILED: %s", name, fold, exc)
            failed += 1
        if last_job[name] == (name, fold):
            log.info("experiment %s: its folds done after %.1f s of the study", name, time.perf_counter() - started)
    return failed


def _predicted_seconds(cfg, study: Study, jobs: list[tuple[str, int]]) -> dict[str, float]:
    """Seconds per fold of each experiment, from rates measured on this device; nothing is
    measured when every fold is finished (a rerun then only rebuilds the report)."""
    try:
        return predict_duration(cfg, study, jobs)
    except RuntimeError as exc:  # the loop has its own back-off; is_out_of_memory() tells OOM apart
        if not is_out_of_memory(exc):
            raise
        log.warning("could not measure the speed for a duration estimate (out of memory at micro-batch %d); "
                    "training goes on and backs off by itself", study.env.micro_batch)
        empty_cache(study.env.device)
        return {}


def release_device_copies(study: Study) -> Study:
    """The study without its device-resident images (and feature maps), their memory given back
    to the device: the parent of --jobs N only waits while its workers train."""
    device = study.env.device
    study = dataclasses.replace(study, source=None)
    gc.collect()  # the rate measurement's model and the cache copy are unreachable now
    empty_cache(device)
    return study


def _say_left_out(cfg, study: Study, names: list[str]) -> None:
    """Once per experiment: the patients it cannot score (no image of its magnifications)."""
    patients = list(study.folds["patient"])
    for name in names:
        exp = experiment_config(cfg, name)
        missing = left_out_patients(study.index, study.usable, patients, exp)
        if missing:
            log.warning("%s scores %d of %d patients: %d have no usable %s image and are left out of every fold: %s",
                        name, len(patients) - len(missing), len(patients), len(missing),
                        "/".join(f"{m}X" for m in exp.magnifications), ", ".join(missing))


def run_study(cfg, prepared: Study, env: EnvInfo, on_fold_end=None) -> tuple[Study, int]:
    """Train every selected experiment x fold; returns the study with its images attached
    and the number of failed folds. on_fold_end() is called after every fold (live report)."""
    install_stop_handlers()  # from here on SIGTERM/SIGINT stop after the current step, saved
    hold_frozen_encoders()  # one frozen encoder for every fold of the study, released at its end
    try:
        return _run_study(cfg, prepared, env, on_fold_end)
    finally:
        hold_frozen_encoders(False)


def _run_study(cfg, prepared: Study, env: EnvInfo, on_fold_end) -> tuple[Study, int]:
    study = attach_features(cfg, attach_images(cfg, prepared, env))  # maps instead of pixels when frozen
    names = selected_experiments(cfg)
    jobs, why = study_job_count(cfg, study.env, len(study.index))
    if why:
        log.info("%s", why)
    order = study_jobs(cfg, names)  # with --select also every candidate's outer and inner folds
    if cfg.select:
        log.info("%s", cost_line(cfg, names))
    try:
        pending = [job for job in order if not is_finished(experiment_config(cfg, job[0]), study, *job)]
    except ForeignRunError as exc:  # the output folder holds another run: a whole-study decision
        raise ConfigError(str(exc)) from None
    if pending:  # one stain reference per outer fold, fitted here once: every job reads it
        fit_study_references(cfg, study, sorted({fold for _, fold in pending}))
    _say_left_out(cfg, study, names)
    predicted = _predicted_seconds(cfg, study, pending) if pending else {}
    tracker = StudyProgress(cfg.output_dir, order, predicted, on_fold_end, workers=max(1, min(jobs, len(pending))))
    started = time.perf_counter()
    try:
        if jobs > 1 or cfg.executor == "ray":
            log.info("running %d experiment x fold jobs on %s", len(pending),
                     "Ray" if cfg.executor == "ray" else f"{jobs} parallel workers")
            for job in [job for job in order if job not in pending]:  # finished earlier: never sent to a worker
                tracker.end_job(*job, False)
            study = release_device_copies(study)  # each worker maps its own; GPU 0 is a worker's too
            log_file = str(Path(cfg.output_dir) / RUN_LOG)
            failed = (run_ray_jobs(cfg, prepared, pending, log_file, tracker) if cfg.executor == "ray"
                      else run_jobs(cfg, prepared, pending, jobs, log_file, tracker))
            study = attach_features(cfg, attach_images(cfg, prepared, env))  # for the report's Grad-CAM
        else:
            failed = run_sequential(cfg, study, order, tracker)  # run_fold skips (and reports) the finished ones
    except BaseException:
        tracker.finish("stopped")
        raise
    write_selection(cfg, names)  # each outer fold's choice, from its inner jobs' predictions
    tracker.finish("reporting")  # the report marks the run finished once it is written
    log.info("study: %d experiment(s) x %d folds (%d jobs) in %.1f s (%d trained, %d finished earlier)", len(names),
             cfg.folds * cfg.cv_repeats, len(order), time.perf_counter() - started, len(pending), len(order) - len(pending))
    return study, failed
