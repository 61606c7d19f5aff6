"""One long-lived Ray actor per job slot (a GPU, or a CPU on a cluster without GPUs).

Ray gives a task that asks for a GPU a fresh process every time (max_calls=1), so a job as a task
would import torch, initialise CUDA, copy the image cache to the device, tune cuDNN and place a
frozen encoder's feature cache again, job after job. An actor pays that once and runs job after
job on the same device. It is threaded (max_concurrency=2) so that the driver's stop reaches a
running job: stop() runs beside run() and asks the loop to stop after its step, exactly as
SIGTERM does in a local worker; the job saves last.pt and returns StopRequested.

The actor's log lines go to the driver through a Ray queue; the driver writes them to its
run.log (one writer, not one appender per host on a network disk).
"""
from __future__ import annotations

import logging
import os

from config import experiment_config
from utils.engine.fold import run_fold
from utils.engine.stop import clear_stop, request_stop
from utils.files import setup_logging
from utils.study.parallel import worker_study

log = logging.getLogger("mmnet")


class ToDriver(logging.Handler):
    """Sends each record's level and text to the driver's queue (a Ray actor)."""

    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait((record.levelno, record.getMessage()))
        except Exception:  # a full or lost queue must never fail the job it reports on
            self.handleError(record)


class JobWorker:
    """Holds the study on its device (image cache, frozen encoder, feature maps) for every job
    it is handed; where one dies the driver starts another and hands it the job."""

    def __init__(self, cfg, prepared, logs):
        import ray

        from backbones import hold_frozen_encoders

        setup_logging(only=ToDriver(logs))  # this process's records go to the driver only
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU
        threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        hold_frozen_encoders()  # one encoder for every job of this worker, not one per fold model
        self.cfg = cfg
        self.study = worker_study(cfg, prepared, device, max(1, threads))
        self.where = f"pid {os.getpid()} on {ray.util.get_node_ip_address()}"
        log.info("ray worker (%s): ready on %s", self.where, device)

    def run(self, name: str, fold: int) -> tuple[dict, int]:
        """One job to its end (or to a stop: StopRequested, last.pt written); its results and
        the process that ran it."""
        clear_stop()
        log.info("ray task (%s): %s fold %d", self.where, name, fold)
        return run_fold(experiment_config(self.cfg, name), self.study, name, fold), os.getpid()

    def stop(self, reason: str) -> None:
        request_stop(reason)
