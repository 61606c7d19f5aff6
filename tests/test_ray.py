"""--executor ray: the study's jobs as Ray tasks on a two-node local cluster give the results of
the local executor, a killed task resumes from its checkpoint, and without Ray one line says
how to install it."""
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import ROOT

ARGS = ["--dry-run", "--backbone", "test_resnet", "--gradcam-patients", "0", "--image-size", "32",
        "--magnification-dropout", "0", "--no-live-report"]


def _main(out, *extra, env=None, timeout=600):
    cmd = [sys.executable, "main.py", *ARGS, "--output-dir", str(out), "--report-file", str(out / "R.md"),
           "--data-dir", str(out.parent / "none"), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


def test_two_nodes_give_the_local_predictions(cluster, tmp_path):
    """One thread per job on both sides: the same float sums, so the same bits."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    study = ["--experiments", "mmnet,single_40x", "--epochs", "1", "--tuples-per-epoch", "16"]
    _finished(_main(local, *study))
    log = _finished(_main(remote, *study, "--executor", "ray", env={"RAY_ADDRESS": cluster.address}))
    assert "2 node(s)" in log
    a, b = _predictions(local), _predictions(remote)
    assert list(a) == list(b) and len(a) == 4
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)
    nodes = set(re.findall(r"ray task \(pid \d+\) on (\S+):", (remote / "run.log").read_text()))
    assert nodes  # the tasks ran on the cluster (both local nodes share this machine's address)


def test_a_killed_task_resumes_from_its_checkpoint(cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    study = ["--experiments", "mmnet", "--epochs", "5", "--tuples-per-epoch", "48", "--checkpoint-minutes", "0"]
    _finished(_main(local, *study))
    driver = _main(remote, *study, "--executor", "ray", env={"RAY_ADDRESS": cluster.address})
    last, pid = remote / "runs" / "mmnet" / "fold0" / "last.pt", None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        found = re.findall(r"ray task \(pid (\d+)\) on \S+: mmnet fold 0", _text(remote / "run.log"))
        if found and last.is_file():
            pid = int(found[0])
            os.kill(pid, signal.SIGKILL)  # the worker dies mid-training, after its first checkpoint
            break
        time.sleep(0.05)
    _finished(driver)
    assert pid is not None, "the task finished before it could be killed"
    results = pd.read_json(remote / "runs" / "mmnet" / "fold0" / "results.json", typ="series")
    assert results["resumed_at_epoch"] >= 1  # the retry started from last.pt, not from scratch
    a, b = _predictions(local), _predictions(remote)
    for key in a:  # the killed job resumed exactly; the other job never noticed
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)
    assert not (remote / "failed_jobs.json").exists()


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
