"""--jobs auto: fold jobs per GPU from its memory (mocked: no GPU here) and the CPU cores, said in
one line with the reason; the option reads from the command line and a YAML file."""
import dataclasses

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
