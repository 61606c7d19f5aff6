"""Experiment x fold jobs spread over several processes: one per GPU (or N CPU workers).

Every fold's seeds derive from (seed, fold, epoch) alone, so the order in which workers pick
jobs cannot change any result: N workers give what one worker gives.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np
import torch

from backbones import hold_frozen_encoders
from config import ConfigError, experiment_config
from preprocess.prepared import attach_images
from preprocess.preprocess import frame_shape
from utils.device import JOB_FIXED_GB, TUPLE_GB, configure_backends, detect_env, jobs_per_gpu_auto
from utils.engine.checkpoint import ForeignRunError
from utils.engine.features import attach_features
from utils.engine.fold import run_fold
from utils.engine.stop import StopRequested, install_stop_handlers, stop_requested
from utils.env import usable_cpus
from utils.files import setup_logging

log = logging.getLogger("mmnet")
_WORKER: dict = {}


def default_jobs(device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" and torch.cuda.device_count() > 1 else 1


def job_memory_gb(cfg, images: int) -> float:
    """Device memory of one fold job: its copy of the image cache (and with a stain reference the
    fold's normalised copy), a step's activations and the fixed part; with --cuda-graphs on also
    the two evaluation recordings' pools (plain and test-time views), each bounded by a training
    step's activations (inference keeps a few layers' maps of four times the tuples)."""
    frame = np.prod(frame_shape(cfg.image_size)) * 3
    copies = 2 if cfg.stain_method() != "none" else 1
    # TUPLE_GB is four 224 px frames: scaled to this frame size and magnification count
    activations = TUPLE_GB * cfg.batch_size * frame / (np.prod(frame_shape(224)) * 3) * len(cfg.magnifications) / 4
    recordings = 2 * activations if cfg.cuda_graphs == "on" else 0
    return images * frame / 1e9 * copies + activations + recordings + JOB_FIXED_GB


def study_job_count(cfg, env, images: int) -> tuple[int, str]:
    """(processes, why): --jobs N as given; 0 one per GPU (1 without); auto per GPU from
    jobs_per_gpu_auto (1 without a GPU: one job uses every core)."""
    if cfg.jobs != "auto":
        return cfg.jobs or default_jobs(env.device), ""
    gpus = torch.cuda.device_count() if env.device == "cuda" else 0
    if not gpus:
        return 1, "--jobs auto: 1 job (no GPU: one job uses every core)"
    per_gpu, why = jobs_per_gpu_auto(env.memory_gb, job_memory_gb(cfg, images), usable_cpus() // gpus)
    return per_gpu * gpus, f"--jobs auto: {per_gpu * gpus} job(s) on {gpus} GPU(s), {why}"


def _init_worker(cfg, prepared, slots, log_file: str, jobs: int) -> None:
    """Runs once in each worker: its device, logging, threads and the shared image cache."""
    setup_logging(log_file)
    install_stop_handlers()
    slot = slots.get()
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else cfg.device
    if device == "cuda":  # more jobs than GPUs share them round-robin
        torch.cuda.set_device(slot % torch.cuda.device_count())  # "cuda" now means this GPU
    else:
        device = "cpu" if device == "auto" else device
    study = worker_study(cfg, prepared, device, max(1, usable_cpus() // jobs))
    _WORKER.update(cfg=cfg, study=study, slot=slot, pid=os.getpid())


def worker_study(cfg, prepared, device: str, threads: int):
    """The study as a worker process (local or a Ray task) trains on it: its threads, device
    settings and backends, and the caches the parent built, mapped only."""
    torch.set_num_threads(threads)
    hold_frozen_encoders()  # a worker runs job after job: one encoder for all of them
    env = detect_env(dataclasses.replace(cfg, device=device, workers=1))
    configure_backends(env.device, cfg.deterministic)  # a spawned process starts with torch's defaults
    return attach_features(cfg, attach_images(cfg, prepared, env))


def _run_job(name: str, fold: int) -> dict:
    w = _WORKER
    log.info("worker %d (slot %d): %s fold %d", w["pid"], w["slot"], name, fold)
    return run_fold(experiment_config(w["cfg"], name), w["study"], name, fold)


def settle_job(name: str, fold: int, fetch, tracker, epochs: int) -> tuple[int, str]:
    """(failed, stop message) of one job whose outcome fetch() returns or raises: the tracker
    hears of a finished job; a foreign run ends the study (ConfigError); a lost job is logged
    and the study goes on. Shared by the local pool and the Ray executor."""
    try:
        results = fetch()
    except ForeignRunError as exc:
        raise ConfigError(str(exc)) from None
    except StopRequested as exc:
        return 0, str(exc)
    except Exception as exc:  # the job is lost, the study goes on
        log.error("%s fold %d FAILED in its worker: %s: %s", name, fold, type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "")
        return 1, ""
    share = 1.0 - results.get("resumed_at_epoch", 0) / epochs  # the part trained in this run
    tracker.end_job(name, fold, True, results.get("wall_seconds_this_run"), share)
    return 0, ""


def _collect(done, pending: dict, pool, tracker, epochs: int) -> tuple[int, str]:
    """Failed jobs and a stop message among the finished futures; a foreign run ends all."""
    failed, stopped = 0, ""
    for future in done:
        name, fold = pending.pop(future)
        if future.cancelled():
            continue
        try:
            lost, stop = settle_job(name, fold, future.result, tracker, epochs)
        except ConfigError:
            pool.shutdown(cancel_futures=True)
            raise
        failed, stopped = failed + lost, stop or stopped
    return failed, stopped


def run_jobs(cfg, prepared, todo: list[tuple[str, int]], jobs: int, log_file: str, tracker) -> int:
    """Run the (experiment, fold) jobs `todo` (those not finished earlier); returns the number
    of failed jobs; `tracker` (the parent's StudyProgress) hears of each finished job. A failed job is reported and the others go on;
    a stop request waits for the
    running jobs to save."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    slots = ctx.Queue()
    for slot in range(jobs):
        slots.put(slot)
    failed, stopped = 0, ""
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg, prepared, slots, log_file, jobs)) as pool:
        pending = {pool.submit(_run_job, n, f): (n, f) for n, f in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            lost, stop = _collect(done, pending, pool, tracker, cfg.epochs)
            failed, stopped = failed + lost, stop or stopped
            if (stopped or stop_requested()) and pending:
                for future in pending:
                    future.cancel()  # not started: skipped; running ones stop themselves
                stopped = stopped or f"{stop_requested()} with jobs pending"
    if stopped:
        raise StopRequested(stopped)
    return failed
