"""--executor ray on a two-node local cluster: long-lived workers run the driver's code and give
the local executor's results; a killed worker is replaced and its job resumes from its
checkpoint; SIGTERM on the driver stops every running job at its step and the rerun resumes them;
without Ray one line says how to install it."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import ROOT

ARGS = ["--dry-run", "--backbone", "test_resnet", "--gradcam-patients", "0", "--image-size", "32",
        "--magnification-dropout", "0", "--no-live-report"]


def _main(out, data, *extra, env=None, cwd=ROOT):
    cmd = [sys.executable, "main.py", *ARGS, "--output-dir", str(out), "--report-file", str(out / "R.md"),
           "--data-dir", str(data), *extra]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _finished(process, timeout=600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    two = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    two.add_node(num_cpus=1)
    two.wait_for_nodes()
    yield two
    two.shutdown()


def _predictions(out) -> dict:
    return {p.relative_to(out): pd.read_csv(p) for p in sorted((out / "runs").glob("*/fold*/predictions.csv"))}


def _same_predictions(a_dir, b_dir, count: int) -> None:
    a, b = _predictions(a_dir), _predictions(b_dir)
    assert list(a) == list(b) and len(a) == count
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)


def _driver_copy(tmp_path):
    """The project as another checkout: the same code with one line changed."""
    copy = tmp_path / "driver_code"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "output", "data", "__pycache__", "*.pyc", ".*cache",
                                                              "mlruns", ".whl", ".gl"))
    with open(copy / "utils" / "env.py", "a") as handle:
        handle.write("# the driver's own checkout\n")
    return copy


def test_six_jobs_run_on_two_long_lived_workers_with_the_drivers_code(cluster, tmp_path, demo_tree):
    """One thread per job on both sides: the same float sums, so the same bits. The driver runs
    from another checkout than the nodes' (one line differs): the workers run the driver's."""
    from utils.env import code_fingerprint

    local, remote, copy = tmp_path / "local", tmp_path / "ray", _driver_copy(tmp_path)
    study = ["--experiments", "mmnet,single_40x,single_100x", "--epochs", "1", "--tuples-per-epoch", "16"]
    _finished(_main(local, demo_tree, *study))
    log = _finished(_main(remote, demo_tree, *study, "--executor", "ray", env={"RAY_ADDRESS": cluster.address}, cwd=copy))
    assert "2 node(s)" in log and "6 job(s) on 2 long-lived worker(s)" in log
    _same_predictions(local, remote, 6)
    jobs = json.loads((remote / "ray_jobs.json").read_text())
    assert len(jobs) == 6 and {j["outcome"] for j in jobs} == {"finished"}
    assert len({pid for j in jobs for pid in j["pids"]}) == 2  # two worker processes ran all six jobs
    driver, nodes = code_fingerprint(copy), code_fingerprint(ROOT)
    assert driver != nodes and f"code {driver} on every node" in log
    assert "ray worker" in (remote / "run.log").read_text()  # the workers' lines reach the driver's log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_tree):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finished(_main(out, demo_tree, *LONG))
    return out


# ~15 s of training per fold: long enough that both jobs are still running when the second
# worker's first line reaches the driver's log, however late the second actor starts
LONG = ["--experiments", "mmnet", "--epochs", "5", "--tuples-per-epoch", "240", "--checkpoint-minutes", "0"]


def test_a_killed_worker_is_replaced_and_its_job_resumes_from_its_checkpoint(cluster, tmp_path, demo_tree, uninterrupted):
    remote = tmp_path / "ray"
    driver = _main(remote, demo_tree, *LONG, "--executor", "ray", env={"RAY_ADDRESS": cluster.address})
    last, pid = remote / "runs" / "mmnet" / "fold0" / "last.pt", None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        found = re.findall(r"ray task \(pid (\d+) on \S+\): mmnet fold 0", _text(remote / "run.log"))
        if found and last.is_file():
            pid = int(found[0])
            os.kill(pid, signal.SIGKILL)  # the worker dies mid-training, after its first checkpoint
            break
        time.sleep(0.05)
    _finished(driver)
    assert pid is not None, "the job finished before its worker could be killed"
    results = pd.read_json(remote / "runs" / "mmnet" / "fold0" / "results.json", typ="series")
    assert results["resumed_at_epoch"] >= 1  # the retry started from last.pt, not from scratch
    _same_predictions(uninterrupted, remote, 2)  # the killed job resumed exactly; the other never noticed
    jobs = {j["fold"]: j for j in json.loads((remote / "ray_jobs.json").read_text())}
    assert jobs[0]["lost_workers"] == 1 and jobs[0]["outcome"] == "finished" and pid not in jobs[0]["pids"]
    assert jobs[1]["lost_workers"] == 0
    assert not (remote / "failed_jobs.json").exists()


def test_sigterm_on_the_driver_stops_every_running_job_at_its_step(cluster, tmp_path, demo_tree, uninterrupted):
    remote = tmp_path / "ray"
    command = [*LONG, "--executor", "ray"]
    driver = _main(remote, demo_tree, *command, env={"RAY_ADDRESS": cluster.address})
    deadline, sent = time.monotonic() + 300, False
    while time.monotonic() < deadline and driver.poll() is None:
        started = re.findall(r"ray task \(pid \d+ on \S+\): mmnet fold (\d)", _text(remote / "run.log"))
        if sorted(started) == ["0", "1"]:  # both jobs have started (their lines reach the log within a second)
            driver.send_signal(signal.SIGTERM)  # a pod being stopped
            sent = True
            break
        time.sleep(0.05)
    output = _finished(driver)
    assert sent, "the jobs finished before the stop"
    assert "Rerun the same command to resume" in output and "Traceback" not in output
    stopped = re.search(r"stopped on request after SIGTERM: (.*); state saved", output).group(1)
    assert sorted(re.findall(r"mmnet fold (\d) epoch \d step \d+", stopped)) == ["0", "1"], output[-3000:]  # each at its step
    for fold in (0, 1):  # every running job saved its step and did not finish
        assert (remote / "runs" / "mmnet" / f"fold{fold}" / "last.pt").is_file()
        assert not (remote / "runs" / "mmnet" / f"fold{fold}" / "results.json").exists()
    jobs = json.loads((remote / "ray_jobs.json").read_text())
    assert [j["outcome"] for j in jobs] == ["stopped", "stopped"]
    _finished(_main(remote, demo_tree, *command, env={"RAY_ADDRESS": cluster.address}))
    _same_predictions(uninterrupted, remote, 2)


def _text(path) -> str:
    return path.read_text() if path.is_file() else ""


def test_ray_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code = main.main(["--dry-run", "--executor", "ray", "--output-dir", str(tmp_path)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "pip install -r requirements-ray.txt" in errors[0]


class _StubRay:
    """The part of Ray the scheduler uses: get() gives what the job returned or raises what it
    raised; a stub worker lost once per job in `dies`."""

    class exceptions:
        class RayActorError(Exception):
            pass

    def __init__(self, outcomes: dict):
        self.outcomes, self.killed = outcomes, []

    def get(self, ref):
        outcome = self.outcomes[ref].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, 1234

    def kill(self, worker, no_restart):
        self.killed.append(worker)


class _StubWorker:
    def __init__(self):
        self.run = self

    def remote(self, name, fold):
        return (name, fold)


class _Tracker:
    def end_job(self, *args):
        pass


def test_a_lost_worker_is_retried_and_an_error_in_the_job_is_not(tmp_path):
    from config import Config
    from utils.engine.train import TrainingError
    from utils.report.build import failed_job_lines
    from utils.study.ray_jobs import Scheduler, _record_jobs

    lost = _StubRay.exceptions.RayActorError
    ray = _StubRay({("a", 0): [lost(), {"wall_seconds_this_run": 1.0}], ("a", 1): [TrainingError("loss is nan")],
                    ("b", 0): [lost(), lost(), lost()]})
    cfg = Config(output_dir=str(tmp_path), job_retries=2, epochs=1)
    scheduler = Scheduler(ray, _StubWorker, 1, [("a", 0), ("a", 1), ("b", 0)], cfg, _Tracker())
    failed = 0
    while scheduler.queue or scheduler.running:
        scheduler.hand_out()
        failed += scheduler.collect(next(iter(scheduler.running)))[0]
    _record_jobs(cfg, scheduler.records)
    jobs = {(j["experiment"], j["fold"]): j for j in json.loads((tmp_path / "ray_jobs.json").read_text())}
    assert failed == 2 and len(ray.killed) == 4  # every lost worker replaced
    assert jobs["a", 0]["outcome"] == "finished" and jobs["a", 0]["lost_workers"] == 1 and jobs["a", 0]["pids"] == [1234]
    assert jobs["a", 1]["outcome"] == "error" and jobs["a", 1]["lost_workers"] == 0  # handed out once, never again
    assert jobs["a", 1]["error"] == "TrainingError: loss is nan"
    assert jobs["b", 0]["outcome"] == "worker lost" and jobs["b", 0]["lost_workers"] == 3  # 1 + --job-retries 2
    line = failed_job_lines(tmp_path)[0]
    assert "a fold 1 (error in the job, not retried: TrainingError: loss is nan)" in line
    assert "b fold 0 (its worker was lost 3 times)" in line and "a fold 0" not in line
