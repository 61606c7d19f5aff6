"""--executor ray: every unfinished experiment x fold job on a Ray cluster, one pod or many.

The driver connects to RAY_ADDRESS (or starts a local Ray) and ships its own code to every node
(runtime_env working_dir: a pod never runs another checkout's code), checks that every node sees
the output folder and the caches at the same path and runs the driver's code, and starts one
long-lived worker per slot (utils.study.ray_worker.JobWorker: a GPU each, or a CPU on a cluster
without GPUs). Jobs are handed to free workers. A job writes exactly what a local job writes, so
resume, skip, the report and --report-only do not change.

- A worker that dies (its process or node lost) is replaced by a new one and its job handed
  back, up to --job-retries times; it resumes from the job's last.pt. An error inside a job is not
  retried (it would fail again). Both kinds are told apart, with their counts, in
  failed_jobs.json (the report names the failed jobs) and ray_jobs.json (every job: worker
  process, node, workers lost).
- SIGTERM or Ctrl-C on the driver asks every running job to finish its step and write last.pt;
  the driver then exits 0 and the same command resumes every job.
- The workers' log lines reach the driver's run.log through a Ray queue.

The local process pool (--executor local, utils.study.parallel) stays the default: it needs no
extra package (Ray is ~80 MB and starts daemons), and on one pod it gives the same results.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from config import ConfigError
from utils.engine.stop import StopRequested, install_stop_handlers, stop_requested
from utils.env import PROJECT_ROOT, code_fingerprint
from utils.files import FAILED_JOBS_FILE, RAY_JOBS_FILE, atomic_write_text
from utils.study.parallel import settle_job
from utils.study.ray_nodes import check_nodes
from utils.study.ray_worker import JobWorker

log = logging.getLogger("mmnet")
INSTALL = "pip install -r requirements-ray.txt"
# What every node gets from the driver's environment. Secrets (HF_TOKEN) are not in the list:
# a runtime_env is stored in the cluster's GCS; each node reads its own token.
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "MPLBACKEND", "TMPDIR")
# Never shipped with the code: run outputs, data, environments, weights and caches.
_NOT_SHIPPED = [".git", "output", "data", ".venv", "venv", "*.pt", "*.pth", "*.npy", "*.safetensors", "mlruns"]


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"[CFG009] executor: Ray is not installed: {INSTALL} (or use --executor local)") from None
    return ray


def runtime_env() -> dict:
    """What every worker process gets: the driver's code (unpacked on each node and imported
    from there) and the run's environment."""
    return {"working_dir": str(PROJECT_ROOT), "excludes": _NOT_SHIPPED,
            "env_vars": {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}}


def shippable(cfg):
    """The config with absolute paths: a worker runs in its unpacked copy of the code, where a
    relative output folder would be a different folder."""
    paths = ("data_dir", "output_dir", "cache_dir", "report_file", "pretrained_file")
    return dataclasses.replace(cfg, **{k: str(Path(getattr(cfg, k)).resolve()) for k in paths if getattr(cfg, k)})


def connect(ray) -> None:
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False, include_dashboard=False,
             ignore_reinit_error=True, configure_logging=False)
    install_stop_handlers(clear=False)  # ray.init installs its own SIGTERM handler, which exits at once
    log.info("ray: %s, %d node(s), resources %s", address or "a local Ray started here",
             len([n for n in ray.nodes() if n["Alive"]]), ray.cluster_resources())


def job_slots(ray) -> tuple[dict, int]:
    """Resources of one worker and how many workers: a GPU each where the cluster has them."""
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, int(total["GPU"])
    return {"num_cpus": 1}, max(1, int(total.get("CPU", 1)))


@dataclass
class JobRecord:
    """What happened to one job: for ray_jobs.json and failed_jobs.json."""
    experiment: str
    fold: int
    lost_workers: int = 0  # workers that died while running it (each time it was handed back)
    pids: list = field(default_factory=list)  # the worker processes that ran it, in order
    outcome: str = "pending"  # finished, stopped, error, worker lost
    error: str = ""


class Scheduler:
    """Hands jobs to free workers and collects what they return."""

    def __init__(self, ray, new_worker, count: int, todo: list, cfg, tracker):
        self.ray, self.cfg, self.tracker, self.new_worker = ray, cfg, tracker, new_worker
        self.free, self.queue = [new_worker() for _ in range(count)], list(todo)
        self.records = {job: JobRecord(*job) for job in todo}
        self.running: dict = {}  # object ref -> (worker, job)

    def hand_out(self) -> None:
        while self.free and self.queue:
            worker, job = self.free.pop(), self.queue.pop(0)
            self.running[worker.run.remote(*job)] = (worker, job)

    def collect(self, ref) -> tuple[int, str]:
        """(failed, stop message) of one returned job; a lost worker's job goes back in the queue."""
        worker, job = self.running.pop(ref)
        record = self.records[job]
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:  # the worker or its node died: a new worker takes its place
            self.ray.kill(worker, no_restart=True)
            self.free.append(self.new_worker())
            return self._lost(job, record)
        except Exception as exc:  # what the job raised: settle_job tells a stop, a foreign run and an error apart
            outcome = exc
        self.free.append(worker)
        failed, stopped = settle_job(*job, lambda: self._result(outcome, record), self.tracker, self.cfg.epochs)
        record.outcome = "stopped" if stopped else "error" if failed else "finished"
        return failed, stopped

    def _lost(self, job: tuple, record: JobRecord) -> tuple[int, str]:
        """A job whose worker died goes back to the front of the queue, --job-retries times."""
        record.lost_workers += 1
        if record.lost_workers <= self.cfg.job_retries:
            log.warning("%s fold %d: its worker was lost; handed to a new worker (retry %d of %d, from its last.pt)",
                        *job, record.lost_workers, self.cfg.job_retries)
            self.queue.insert(0, job)
            return 0, ""
        record.outcome = "worker lost"
        log.error("%s fold %d FAILED: its worker was lost %d times", *job, record.lost_workers)
        return 1, ""

    @staticmethod
    def _result(outcome, record: JobRecord) -> dict:
        """A job's results, or what it raised (Ray wraps it; the cause is what the job raised)."""
        if isinstance(outcome, Exception):
            cause = getattr(outcome, "cause", None) or outcome
            if isinstance(cause, StopRequested):
                raise StopRequested(str(cause)) from None  # where the job stopped, not Ray's traceback
            record.error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            raise outcome
        results, pid = outcome
        record.pids.append(pid)
        return results

    def stop_all(self, reason: str) -> None:
        """Each running job finishes its step and writes last.pt; jobs not started are dropped."""
        log.warning("stop requested (%s): %d running Ray job(s) save their state, %d not started",
                    reason, len(self.running), len(self.queue))
        for worker, _ in self.running.values():
            worker.stop.remote(reason)
        self.queue.clear()


def run_ray_jobs(cfg, prepared, todo: list[tuple[str, int]], log_file: str, tracker) -> int:
    """The jobs `todo` on Ray's workers; returns the number of failed jobs (see the module docstring)."""
    ray = import_ray()
    from ray.util.queue import Queue

    cfg = shippable(cfg)
    connect(ray)
    try:
        code = code_fingerprint()
        check_nodes(ray, cfg, code)
        resources, slots = job_slots(ray)
        count = max(1, min(slots, len(todo)))
        tracker.workers = count  # the ETA shares the work among the workers
        logs = Queue(actor_options={"num_cpus": 0})
        actor = ray.remote(max_restarts=0, max_concurrency=2, **resources)(JobWorker)
        shared = ray.put(prepared)
        log.info("ray: %d job(s) on %d long-lived worker(s), code %s on every node", len(todo), count, code)
        scheduler = Scheduler(ray, lambda: actor.remote(cfg, shared, logs), count, todo, cfg, tracker)
        failed, stopped = _drive(ray, scheduler, logs)
        _record_jobs(cfg, scheduler.records)
        if stopped:
            raise StopRequested(stopped)
        return failed
    finally:
        ray.shutdown()


def _drive(ray, scheduler: Scheduler, logs) -> tuple[int, str]:
    """Until every job returned: hand out, collect, pass the workers' log lines on, and on a
    stop request (heard within a second, whatever the jobs do) stop every running job."""
    failed, stops, asked = 0, [], ""
    while scheduler.queue or scheduler.running:
        scheduler.hand_out()
        ready, _ = ray.wait(list(scheduler.running), num_returns=1, timeout=1.0)
        _pass_on(logs)
        for ref in ready:
            missed, stop = scheduler.collect(ref)
            failed, stops = failed + missed, stops + ([stop] if stop else [])
        if (stop_requested() or stops) and not asked:
            asked = stop_requested() or "a job's stop"
            scheduler.stop_all(asked)
    _pass_on(logs)
    return failed, (f"{asked}: " + ", ".join(stops or ["no job was running"])) if asked else ""


def _pass_on(logs) -> None:
    """The workers' log lines into this process's log (run.log and the console)."""
    if logs.size():
        for level, message in logs.get_nowait_batch(logs.size()):
            log.log(level, "%s", message)


def _record_jobs(cfg, records: dict) -> None:
    """ray_jobs.json: every job's worker processes and lost workers; failed_jobs.json: the
    jobs that did not finish for a reason a rerun does not fix by itself being a stop."""
    out = Path(cfg.output_dir)
    rows = [dataclasses.asdict(r) for r in records.values()]
    atomic_write_text(out / RAY_JOBS_FILE, json.dumps(rows, indent=2))
    lost = [r for r in rows if r["outcome"] in ("error", "worker lost")]
    if lost:
        atomic_write_text(out / FAILED_JOBS_FILE, json.dumps(lost, indent=2))
    else:
        (out / FAILED_JOBS_FILE).unlink(missing_ok=True)
