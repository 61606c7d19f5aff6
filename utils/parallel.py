"""Experiment x fold jobs spread over several processes: one per GPU (or N CPU workers).

Every fold's seeds derive from (seed, fold, epoch) alone, so the order in which workers pick
jobs cannot change any result: N workers give what one worker gives.
"""
from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

log = logging.getLogger("mmnet")
_WORKER: dict = {}


def default_jobs(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" and torch.cuda.device_count() > 1 else 1


def _init_worker(cfg, study, slots, log_file: str, jobs: int) -> None:
    """Runs once in each worker: its device, logging, threads and the shared image cache."""
    import os

    import torch

    from config import detect_env, usable_cpus
    from utils.helpers import install_stop_handlers, setup_logging
    from utils.study import load_images

    setup_logging(log_file)
    install_stop_handlers()
    slot = slots.get()
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else cfg.device
    if device == "cuda":  # more jobs than GPUs share them round-robin
        torch.cuda.set_device(slot % torch.cuda.device_count())  # "cuda" now means this GPU
    else:
        device = "cpu" if device == "auto" else device
    torch.set_num_threads(max(1, usable_cpus() // jobs))
    env = detect_env(device, cfg.batch_size, 1)
    source, usable = load_images(cfg, env, study)  # the parent built it: this only maps it
    _WORKER.update(cfg=cfg, study=study, env=env, source=source, usable=usable, slot=slot, pid=os.getpid())


def _run_job(name: str, fold: int, folds_hash: str) -> dict:
    from config import experiment_config
    from utils.train import run_fold

    w = _WORKER
    log.info("worker %d (slot %d): %s fold %d", w["pid"], w["slot"], name, fold)
    return run_fold(experiment_config(w["cfg"], name), w["env"], w["study"], w["source"], name, fold,
                    w["usable"], folds_hash)


def run_jobs(cfg, study, names: list[str], folds_hash: str, jobs: int, log_file: str) -> int:
    """Run every (experiment, fold); returns the number of failed jobs. A failed job is
    reported and the others go on; a stop request waits for the running jobs to save."""
    import multiprocessing

    from config import ConfigError
    from utils.helpers import StopRequested, stop_requested
    from utils.train import ForeignRunError

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    slots = ctx.Queue()
    for slot in range(jobs):
        slots.put(slot)
    failed, stopped = 0, ""
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg, study, slots, log_file, jobs)) as pool:
        pending = {pool.submit(_run_job, n, f, folds_hash): (n, f) for n in names for f in range(cfg.folds)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, fold = pending.pop(future)
                if future.cancelled():
                    continue
                try:
                    future.result()
                except ForeignRunError as exc:
                    pool.shutdown(cancel_futures=True)
                    raise ConfigError(str(exc)) from None
                except StopRequested as exc:
                    stopped = str(exc)
                except Exception as exc:  # the job is lost, the study goes on
                    failed += 1
                    log.error("%s fold %d FAILED in its worker: %s: %s", name, fold, type(exc).__name__, exc)
            if (stopped or stop_requested()) and pending:
                for future in pending:
                    future.cancel()  # not started: skipped; running ones stop themselves
                stopped = stopped or f"{stop_requested()} with jobs pending"
    if stopped:
        raise StopRequested(stopped)
    return failed
