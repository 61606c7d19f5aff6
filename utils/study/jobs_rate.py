"""Training throughput with several fold jobs on one device at once: the measurement that
--jobs auto's choice waits for.

    python -m utils.study.jobs_rate --device cuda --jobs 1,2,4 [--backbone resnet18] [--image-size 224] [--batches 8]

Each job is a spawned process, as a fold job of `--jobs N` is: it builds the benchmark's
synthetic MMNet fold on the device (its own cache, normalised copy, model and optimizer), warms
up, waits at a barrier until every job of the round is ready, then trains `batches` steps
through the real loop. The round's rate is every job's tuples over the span from the first
start to the last end, so it counts only time in which the jobs shared the device; each job
gets the cores divided by the jobs, as the study's workers do.
Rows (tables/jobs_rate.csv): jobs, tuples/s of the round and of its slowest job, the share of
the round in which all its jobs trained, and the speedup over one job (1 job's rate x jobs is
the ceiling; a launch-bound step gets closer to it than a FLOP-bound one).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pandas as pd
import torch

from config import Config
from utils.files import markdown_table

JOBS_RATE_FILE = "jobs_rate.csv"  # in <output>/tables/


def _job(cfg: Config, batches: int, threads: int, barrier, results) -> None:
    """One job of a round (a spawned process): (start, end, tuples) of its timed training."""
    from utils.device import configure_backends, detect_env
    from utils.study.benchmark import synthetic_study
    from utils.study.rates import training_span

    torch.set_num_threads(threads)
    env = detect_env(cfg)
    configure_backends(env.device, deterministic=False)
    state, loop, _ = synthetic_study(cfg, env, batches)
    generator = torch.Generator(device=loop.source.device).manual_seed(0)
    training_span(state, loop, 2 * loop.batch_size, generator, seed=0)  # allocator, autotuning
    barrier.wait()
    start, end = training_span(state, loop, batches * loop.batch_size, generator, seed=1)
    results.put((start, end, batches * loop.batch_size))


def round_rates(cfg: Config, jobs: int, batches: int) -> dict:
    """Run `jobs` jobs at once; tuples/s of the round and of its slowest job."""
    ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    workers = [ctx.Process(target=_job, args=(cfg, batches, threads, barrier, results)) for _ in range(jobs)]
    for worker in workers:
        worker.start()
    spans = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"a job of the {jobs}-job round exited with {worker.exitcode}")
    starts, ends = [start for start, _, _ in spans], [end for _, end, _ in spans]
    wall = max(ends) - min(starts)
    return {"jobs": jobs, "tuples_per_s": sum(n for _, _, n in spans) / wall,
            "slowest_job_tuples_per_s": min(n / (end - start) for start, end, n in spans),
            # the share of the round in which every job trained: near 1 when the barrier held
            "all_running_share": max(0.0, min(ends) - max(starts)) / wall}


def jobs_table(cfg: Config, job_counts: list[int], batches: int) -> pd.DataFrame:
    """One row per job count, with the speedup over the 1-job round (or the first measured)."""
    table = pd.DataFrame([round_rates(cfg, jobs, batches) for jobs in job_counts])
    table["speedup"] = table["tuples_per_s"] / table["tuples_per_s"].iloc[0] * table["jobs"].iloc[0]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2,4", help="job counts to measure, comma-separated")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=Config.batch_size, help="tuples per optimizer step")
    parser.add_argument("--batches", type=int, default=8, help="timed training steps per job")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--output-dir", default="output")
    args = parser.parse_args(argv)
    try:
        job_counts = [int(part) for part in args.jobs.split(",")]
    except ValueError:
        parser.error(f"--jobs takes job counts such as 1,2,4, got {args.jobs!r}")
    if min(job_counts) < 1:
        parser.error(f"--jobs counts must be 1 or more, got {args.jobs!r}")
    cfg = dataclasses.replace(Config(), backbone=args.backbone, image_size=args.image_size, pretrained="off",
                              device=args.device, batch_size=args.batch)
    table = jobs_table(cfg, job_counts, args.batches)
    out = Path(args.output_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / JOBS_RATE_FILE, index=False)
    print(markdown_table(table.round(3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
