"""Where a long run stands: job k of N, elapsed, ETA for the whole study, progress.json.

The study hands one StudyProgress to every fold it trains; the fold reports each epoch and its
start and end to it (engine.fold.NO_PROGRESS where no study watches: tests, workers). The ETA starts from
the benchmark's predicted seconds per job and is rescaled by how fast the jobs actually ran.
Bars (tqdm) only on a terminal; plain log lines otherwise (pod logs, CI, files).
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from utils.files import PROGRESS_FILE, atomic_write_text, duration, on_terminal

log = logging.getLogger("mmnet")


class StudyProgress:
    """Jobs (experiment, fold) in the order they run, with predicted seconds for each."""

    def __init__(self, out_dir: str | Path, jobs: list[tuple[str, int]], predicted: dict[str, float],
                 on_fold_end=None, workers: int = 1):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.jobs, self.predicted = jobs, predicted  # predicted: seconds per fold of each experiment
        self.workers = workers  # jobs that run at once (parallel workers share the remaining work)
        self.on_fold_end = on_fold_end  # e.g. rewrite the live report
        self.started = time.perf_counter()
        self.done: set = set()
        self.measured, self.expected = 0.0, 0.0  # seconds of jobs that trained, and their prediction
        self.current, self.job_started, self.fraction = None, self.started, 0.0
        self.resumed_at = 0.0  # share of the current job done before this run (a resumed fold)
        self.bar = tqdm(total=len(jobs), desc="study", dynamic_ncols=True) if on_terminal() else None

    def _scale(self) -> float:
        """Measured over predicted time of the work trained in this run (1 until something
        trained): a skipped fold, or the part of a resumed one done earlier, counts in neither."""
        running = time.perf_counter() - self.job_started if self.current else 0.0
        trained_now = max(0.0, self.fraction - self.resumed_at)
        expected = self.expected + trained_now * self.predicted.get(self.current[0], 0.0) if self.current else self.expected
        measured = self.measured + running
        return min(4.0, max(0.25, measured / expected)) if expected > 1.0 and measured > 1.0 else 1.0

    def eta_seconds(self) -> float:
        left = sum(self.predicted.get(name, float("nan")) for name, fold in self.jobs
                   if (name, fold) not in self.done and (name, fold) != self.current)
        if self.current:
            left += (1 - self.fraction) * self.predicted.get(self.current[0], float("nan"))
        return left * self._scale() / self.workers

    def start_job(self, name: str, fold: int, done_share: float = 0.0) -> None:
        """`done_share`: the part of the job finished before this run (a fold resumed at epoch e
        of E has e/E done)."""
        self.current, self.job_started = (name, fold), time.perf_counter()
        self.fraction = self.resumed_at = done_share
        self.write("running")

    def epoch_done(self, name: str, fold: int, epoch: int, epochs: int) -> None:
        self.fraction = (epoch + 1) / epochs
        self.write("running", f"epoch {epoch + 1}/{epochs}")

    def end_job(self, name: str, fold: int, trained: bool, seconds: float | None = None,
                share: float | None = None) -> None:
        """A job ended; `seconds` is its own training time and `share` the part of the job it
        trained, where it ran elsewhere (a worker); here they are known from start_job."""
        if trained:
            share = (1.0 - self.resumed_at) if share is None else share
            self.measured += seconds if seconds is not None else time.perf_counter() - self.job_started
            self.expected += share * self.predicted.get(name, 0.0)
        self.done.add((name, fold))
        self.current, self.fraction, self.resumed_at = None, 0.0, 0.0
        if self.bar is not None:
            self.bar.update(1)
        self.write("running", "fold done" if trained else "fold skipped: done earlier")
        if self.on_fold_end is not None:
            self.on_fold_end()

    def finish(self, state: str = "finished") -> None:
        self.current = None
        self.write(state)
        if self.bar is not None:
            self.bar.close()

    def snapshot(self, state: str, detail: str = "") -> dict:
        elapsed, eta = time.perf_counter() - self.started, self.eta_seconds()
        job = len(self.done) + (1 if self.current else 0)
        return {"state": state, "job": job, "jobs": len(self.jobs),
                "experiment": self.current[0] if self.current else "", "fold": self.current[1] if self.current else None,
                "detail": detail, "elapsed_s": round(elapsed, 1), "eta_s": None if eta != eta else round(eta, 1),
                "eta_at": "" if eta != eta else (datetime.now() + timedelta(seconds=eta)).isoformat(timespec="seconds"),
                "updated": datetime.now().isoformat(timespec="seconds")}

    def write(self, state: str, detail: str = "") -> None:
        info = self.snapshot(state, detail)
        atomic_write_text(self.path, json.dumps(info, indent=2))
        if state == "running" and detail:
            where = f"{info['experiment']} fold {info['fold']} " if info["experiment"] else ""
            log.info("progress: job %d of %d | %s%s | elapsed %s | ETA %s (study)", info["job"], info["jobs"],
                     where, detail, duration(info["elapsed_s"]), duration(info["eta_s"] if info["eta_s"] is not None else float("nan")))
