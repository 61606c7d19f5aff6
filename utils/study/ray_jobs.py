"""--executor ray: every unfinished experiment x fold job as a Ray task, on one pod or many.

The driver connects to RAY_ADDRESS (or starts a local Ray), checks that every node sees the
output folder and the image cache at the same path, and submits one task per job asking for
one GPU (one CPU on a cluster without GPUs). A task writes exactly what a local job writes, so
resume, skip, the report and --report-only do not change. A task whose worker or node dies is
retried by Ray up to --job-retries times and resumes from the job's last.pt; after that it is
a failed job, in the log and in failed_jobs.json (the report lists it), and the others go on.
Progress, ETA and the live report stay on the driver.

The local process pool (--executor local, utils.study.parallel) stays the default: it needs no
extra package (Ray is ~80 MB and starts daemons), and on one pod it gives the same results.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from config import ConfigError, experiment_config
from utils.engine.fold import run_fold
from utils.engine.stop import StopRequested, stop_requested
from utils.env import PROJECT_ROOT
from utils.files import FAILED_JOBS_FILE, atomic_write_text, setup_logging
from utils.study.parallel import settle_job, worker_study

log = logging.getLogger("mmnet")
INSTALL = "pip install -r requirements-ray.txt"
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "MPLBACKEND", "TMPDIR")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"[CFG009] executor: Ray is not installed: {INSTALL} (or use --executor local)") from None
    return ray


def runtime_env() -> dict:
    """What every task's worker process gets: the project importable, the run's environment."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, **{k: os.environ[k] for k in _PASSED_ENV if k in os.environ}}}


def _sees(probe: str, token: str, cache: str) -> tuple[str, bool, bool]:
    """Run on one node: its address, whether it reads the driver's probe file and the cache."""
    import ray

    ok = Path(probe).is_file() and Path(probe).read_text() == token
    return ray.util.get_node_ip_address(), ok, Path(cache).is_dir()


def check_shared_storage(ray, cfg) -> None:
    """Every alive node must see the output folder and the image cache at the same path."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe, token = Path(cfg.output_dir) / ".ray_probe", uuid.uuid4().hex
    atomic_write_text(probe, token)
    sees = ray.remote(num_cpus=0)(_sees)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    answers = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                       .remote(str(probe), token, str(cfg.resolved_cache_dir())) for n in nodes])
    probe.unlink(missing_ok=True)
    blind = [ip for ip, out_ok, cache_ok in answers if not (out_ok and cache_ok)]
    if blind:
        raise ConfigError(f"[CFG011] executor: node(s) {', '.join(sorted(set(blind)))} do not see {cfg.output_dir} and "
                          f"{cfg.resolved_cache_dir()}: put --output-dir (and --cache-dir) on storage every pod mounts "
                          f"at the same path (the RunPod network volume at /workspace)")


def _run_task(cfg, prepared, name: str, fold: int, log_file: str) -> dict:
    """One job inside a Ray worker: its device, threads, logging and the shared cache."""
    import ray

    setup_logging(log_file)  # the run's log on the shared volume, as a local worker's
    device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray has set CUDA_VISIBLE_DEVICES to this task's GPU
    threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    study = worker_study(cfg, prepared, device, max(1, threads))
    log.info("ray task (pid %d) on %s: %s fold %d", os.getpid(), ray.util.get_node_ip_address(), name, fold)
    return run_fold(experiment_config(cfg, name), study, name, fold)


def job_slots(ray) -> tuple[dict, int]:
    """Resources of one task and how many run at once: a GPU each where the cluster has them."""
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, int(total["GPU"])
    return {"num_cpus": 1}, max(1, int(total.get("CPU", 1)))


def connect(ray) -> None:
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False, include_dashboard=False,
             ignore_reinit_error=True, configure_logging=False)
    log.info("ray: %s, %d node(s), resources %s", address or "a local Ray started here",
             len([n for n in ray.nodes() if n["Alive"]]), ray.cluster_resources())


def run_ray_jobs(cfg, prepared, todo: list[tuple[str, int]], log_file: str, tracker) -> int:
    """The jobs `todo` as Ray tasks; returns the number of failed jobs (see the module docstring)."""
    ray = import_ray()
    connect(ray)
    try:
        check_shared_storage(ray, cfg)
        resources, slots = job_slots(ray)
        tracker.workers = max(1, min(slots, len(todo)))  # the ETA shares the work among the cluster's slots
        task = ray.remote(max_retries=cfg.job_retries, **resources)(_run_task)
        shared = ray.put(prepared)
        pending = {task.remote(cfg, shared, n, f, log_file): (n, f) for n, f in todo}
        failed, lost = 0, []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)  # a stop request is heard between
            for ref in ready:
                name, fold = pending.pop(ref)
                missed, stopped = settle_job(name, fold, lambda ref=ref: ray.get(ref), tracker, cfg.epochs)
                failed += missed
                lost += [{"experiment": name, "fold": fold, "retries": cfg.job_retries}] if missed else []
                if stopped or stop_requested():
                    _stop(ray, pending, stopped or stop_requested())
        _record_failures(cfg, lost)
        return failed
    finally:
        ray.shutdown()


def _stop(ray, pending: dict, reason: str) -> None:
    """Jobs not started are dropped; running ones are interrupted (their last.pt resumes them)."""
    for ref in pending:
        ray.cancel(ref)
    raise StopRequested(f"{reason} with {len(pending)} Ray job(s) pending")


def _record_failures(cfg, lost: list[dict]) -> None:
    path = Path(cfg.output_dir) / FAILED_JOBS_FILE
    if lost:
        atomic_write_text(path, json.dumps(lost, indent=2))
    else:
        path.unlink(missing_ok=True)
