"""--jobs auto: fold jobs per GPU from its memory (mocked: no GPU here) and the CPU cores, said in
one line with the reason; the option reads from the command line and a YAML file; the GPU check's
measurement of 1, 2 and 4 jobs at once (utils.study.jobs_rate) runs its jobs together."""
import dataclasses

import pandas as pd
import pytest
import torch

import utils.study.parallel as parallel
from config import ConfigError, parse_args, read_config_file
from utils.device import MAX_JOBS_PER_GPU, EnvInfo, jobs_per_gpu_auto


@pytest.mark.parametrize(("memory", "job", "cores", "expected"), [
    (80, 13.0, 16, MAX_JOBS_PER_GPU),  # an H100: the cap
    (48, 13.0, 16, 3),  # an A40: memory
    (24, 13.0, 16, 1),  # an RTX 4090: memory
    (80, 13.0, 4, 2),  # few cores: two each
    (16, 20.0, 16, 1),  # not even one fits: still one
])
def test_jobs_per_gpu_from_memory_and_cores(memory, job, cores, expected):
    jobs, why = jobs_per_gpu_auto(memory, job, cores)
    assert jobs == expected and why.startswith(f"{expected} per GPU") and f"{job:.1f} GB" in why


def test_recorded_evaluation_adds_its_pools_to_a_job():
    cfg = parse_args(["--image-size", "224"])
    graphed = dataclasses.replace(cfg, cuda_graphs="on")
    plain_gb, graphed_gb = parallel.job_memory_gb(cfg, 7909), parallel.job_memory_gb(graphed, 7909)
    activations = parallel.job_memory_gb(cfg, 0) - parallel.JOB_FIXED_GB
    assert graphed_gb - plain_gb == pytest.approx(2 * activations) and activations > 0


def test_a_job_holds_its_cache_and_the_folds_normalised_copy():
    cfg = parse_args(["--image-size", "224"])
    plain = dataclasses.replace(cfg, stain_norm="none")
    cache = 7909 * 224 * 341 * 3 / 1e9  # the default study's uint8 cache
    assert parallel.job_memory_gb(cfg, 7909) - parallel.job_memory_gb(plain, 7909) == pytest.approx(cache)
    assert parallel.job_memory_gb(plain, 7909) > cache


def test_auto_on_two_mocked_gpus_and_the_other_values(monkeypatch):
    cfg = parse_args(["--jobs", "auto", "--image-size", "224"])
    gpu = EnvInfo(device="cuda", amp_dtype="bfloat16", batch_size=32, micro_batch=32, workers=8, memory_gb=80.0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 32)
    jobs, why = parallel.study_job_count(cfg, gpu, 7909)
    per_gpu = min(MAX_JOBS_PER_GPU, int(72 // parallel.job_memory_gb(cfg, 7909)), 8)
    assert jobs == 2 * per_gpu and why.startswith(f"--jobs auto: {jobs} job(s) on 2 GPU(s)")
    cpu = dataclasses.replace(gpu, device="cpu", memory_gb=0.0)
    assert parallel.study_job_count(cfg, cpu, 7909)[0] == 1
    assert parallel.study_job_count(dataclasses.replace(cfg, jobs=3), gpu, 7909) == (3, "")
    assert parallel.study_job_count(dataclasses.replace(cfg, jobs=0), gpu, 7909) == (2, "")  # one per GPU


def test_auto_reads_from_a_file_and_a_bad_value_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("jobs: auto\n")
    assert read_config_file(path) == {"jobs": "auto"}
    with pytest.raises(ConfigError, match="CFG003.*jobs.*>= 0 or auto"):
        parse_args(["--jobs", "-2"])
    with pytest.raises(SystemExit):
        parse_args(["--jobs", "many"])


def test_the_jobs_rate_runs_its_jobs_at_once_and_writes_one_row_per_round(tmp_path):
    """The GPU check's jobs-per-GPU part on the CPU: two spawned jobs train together (the barrier
    holds them until both are built), and the table has the round's figures."""
    from utils.study.jobs_rate import JOBS_RATE_FILE, main

    assert main(["--device", "cpu", "--jobs", "2", "--image-size", "32", "--batch", "4", "--batches", "2",
                 "--output-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "tables" / JOBS_RATE_FILE)
    row = table.iloc[0]
    assert table["jobs"].tolist() == [2]
    assert row["all_running_share"] > 0  # without the barrier one job's whole build would separate them
    assert 0 < row["slowest_job_tuples_per_s"] <= row["tuples_per_s"]
    assert row["speedup"] == 2  # the first round is the reference: its own jobs x 1


def test_the_jobs_rate_refuses_a_count_it_cannot_run(capsys):
    from utils.study.jobs_rate import main

    with pytest.raises(SystemExit):
        main(["--jobs", "one,two"])
    assert "--jobs takes job counts such as 1,2,4" in capsys.readouterr().err
