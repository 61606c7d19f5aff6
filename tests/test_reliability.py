"""Interruption, out-of-memory, determinism across processes, settings per device."""
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

import preprocess.image_source as image_source_module
import utils.engine.fold as fold_module
import utils.engine.saving as saving
import utils.engine.train as train
from tests.conftest import ROOT, tiny_config, tiny_study
from utils.device import out_of_memory_error
from utils.engine.saving import load_checkpoint
from utils.engine.stop import StopRequested


def _run(cfg, demo_tree, demo_index, fold=0):
    return fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", fold)


def _predictions(cfg):
    return pd.read_csv(f"{cfg.output_dir}/runs/mmnet/fold0/predictions.csv")


def test_stop_mid_epoch_saves_the_step_and_resumes_exactly(tmp_path, demo_tree, demo_index, monkeypatch):
    whole = tiny_config(tmp_path / "whole", epochs=2)
    _run(whole, demo_tree, demo_index)

    cut = tiny_config(tmp_path / "cut", epochs=2)
    calls = {"n": 0}

    def stop_after_six_steps():  # 4 steps per epoch: stops in epoch 2 after its 2nd step
        calls["n"] += 1
        return "SIGTERM" if calls["n"] == 6 else ""

    monkeypatch.setattr(fold_module, "stop_requested", stop_after_six_steps)
    with pytest.raises(StopRequested, match="epoch 2 step 2"):
        _run(cut, demo_tree, demo_index)
    saved = load_checkpoint(tmp_path / "cut/runs/mmnet/fold0/last.pt")
    assert (saved["epoch"], saved["step"], len(saved["partial_losses"])) == (1, 2, 2)
    monkeypatch.setattr(fold_module, "stop_requested", lambda: "")
    _run(cut, demo_tree, demo_index)
    pd.testing.assert_frame_equal(_predictions(whole), _predictions(cut), check_exact=True)
    columns = ["epoch", "train_loss", "train_binary_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole/runs/mmnet/fold0/history.csv")[columns],
                                  pd.read_csv(tmp_path / "cut/runs/mmnet/fold0/history.csv")[columns])


def test_out_of_memory_halves_the_micro_batch_and_goes_on(tmp_path, demo_tree, demo_index, monkeypatch, caplog):
    real_prepare = image_source_module.model_input

    def small_memory(images, *args, **kwargs):
        if images.shape[0] > 4:
            raise out_of_memory_error()("simulated: CUDA out of memory")
        return real_prepare(images, *args, **kwargs)

    monkeypatch.setattr(image_source_module, "model_input", small_memory)
    cfg = tiny_config(tmp_path, epochs=2, batch_size=8)
    result = _run(cfg, demo_tree, demo_index)
    assert result["epochs_run"] == 2 and result["accumulation"] == 2
    assert "micro-batches of 4 (x2 accumulation)" in caplog.text


def _main(out, data, *extra):
    """A dry run of mmnet on `data` (the session's small demo tree: no pictures to draw first)."""
    return [sys.executable, "main.py", "--dry-run", "--experiments", "mmnet", "--backbone", "test_resnet",
            "--epochs", "2", "--tuples-per-epoch", "32", "--image-size", "32", "--gradcam-patients", "0", "--output-dir", str(out),
            "--report-file", str(out / "R.md"), "--data-dir", str(data), "--no-live-report", *extra]


def _kill_after_first_epoch(cmd, sig):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "fold 0 epoch 1/2" in line:
            proc.send_signal(sig)
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_tree):
    whole = tmp_path_factory.mktemp("whole")
    assert subprocess.run(_main(whole, demo_tree), cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    return whole


def test_stopped_run_reruns_to_the_uninterrupted_result(tmp_path, uninterrupted, demo_tree):
    """SIGTERM (a pod being stopped) after the first epoch: exit 0, and the same command resumes to
    the uninterrupted predictions. A process killed outright (SIGKILL) resumes from the same
    last.pt: tests/test_ray.py kills a worker mid-fold and compares its predictions the same way."""
    whole = uninterrupted
    cut = tmp_path / "cut"
    code, output = _kill_after_first_epoch(_main(cut, demo_tree), signal.SIGTERM)
    assert code == 0 and "Rerun the same command to resume" in output and "Traceback" not in output
    assert not (cut / "runs/mmnet/fold1/results.json").exists()
    again = subprocess.run(_main(cut, demo_tree), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:]
    for fold in (0, 1):
        a = pd.read_csv(whole / f"runs/mmnet/fold{fold}/predictions.csv")
        b = pd.read_csv(cut / f"runs/mmnet/fold{fold}/predictions.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_two_worker_processes_give_the_one_worker_results(tmp_path, demo_tree):
    """Jobs in parallel processes: same folds, seeds and results as one process, bit for bit.

    One thread per job on both sides (OMP_NUM_THREADS=1 for the one-process run; each of the two
    workers gets one of two threads): a different number of threads sums floats in a different
    order (measured here: up to 3e-4 in a probability between 2 threads and 1), which says
    nothing about the workers.
    """
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        cmd = [sys.executable, "main.py", "--dry-run", "--experiments", "mmnet,single_40x", "--backbone",
               "test_resnet", "--jobs", str(jobs), "--gradcam-patients", "0", "--epochs", "1", "--image-size", "32",
               "--tuples-per-epoch", "16", "--magnification-dropout", "0", "--stain-norm", "none", "--output-dir", str(out),
               "--report-file", str(out / "R.md"), "--data-dir", str(demo_tree), "--no-live-report"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-2000:]
        runs[jobs] = out
    assert "on 2 parallel workers" in (runs[2] / "run.log").read_text()
    for run in ("mmnet/fold0", "mmnet/fold1", "single_40x/fold0", "single_40x/fold1"):
        a = pd.read_csv(runs[1] / "runs" / run / "predictions.csv")
        b = pd.read_csv(runs[2] / "runs" / run / "predictions.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    one = pd.read_csv(runs[1] / "tables" / "per_fold.csv")
    two = pd.read_csv(runs[2] / "tables" / "per_fold.csv")
    pd.testing.assert_frame_equal(one, two)


def test_device_settings_for_cpu_and_forced_device():
    from config import Config
    from utils.device import DeviceError, detect_env

    env = detect_env(Config(device="cpu", batch_size=24))
    assert env.device == "cpu" and env.amp_dtype == "none" and env.workers >= 1
    assert env.batch_size == 24 and 1 <= env.micro_batch <= 24  # the step is the config's, not the device's
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            detect_env(Config(device="cuda"))


def test_failed_fold_is_reported_and_the_rest_continue(monkeypatch, caplog, tmp_path):
    import utils.study.runner as study_module
    from utils.engine.fold import NO_PROGRESS

    ran = []

    def first_fold_fails(cfg, study, name, fold, progress):
        if fold == 0:
            raise train.TrainingError("non-finite loss at epoch 0 step 0")
        ran.append(fold)
        return {"fold": fold}

    monkeypatch.setattr(study_module, "run_fold", first_fold_fails)
    failed = study_module.run_sequential(tiny_config(tmp_path), None, [("mmnet", 0), ("mmnet", 1)], NO_PROGRESS)
    assert failed == 1 and ran == [1]
    assert "mmnet fold 0 FAILED: non-finite loss at epoch 0 step 0" in caplog.text


def test_out_of_memory_in_the_first_epoch_restarts_from_the_initial_state(tmp_path, demo_tree, demo_index, monkeypatch):
    """Replaying epoch 1 after an out-of-memory equals training with the smaller micro-batch
    from the start: the replay really begins from the initial weights."""
    real_prepare = image_source_module.model_input
    calls = {"n": 0}

    def fails_on_third_batch(images, *args, **kwargs):  # after two steps have changed the weights
        calls["n"] += 1
        if calls["n"] == 3 and images.shape[0] > 4:
            raise out_of_memory_error()("simulated: CUDA out of memory")
        return real_prepare(images, *args, **kwargs)

    monkeypatch.setattr(image_source_module, "model_input", fails_on_third_batch)
    replayed = tiny_config(tmp_path / "replayed", epochs=1)
    assert _run(replayed, demo_tree, demo_index)["accumulation"] == 2
    monkeypatch.setattr(image_source_module, "model_input", real_prepare)
    direct = tiny_config(tmp_path / "direct", epochs=1)
    original = fold_module.FoldState.__init__

    def start_with_accumulation(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.accumulation = 2

    monkeypatch.setattr(fold_module.FoldState, "__init__", start_with_accumulation)
    _run(direct, demo_tree, demo_index)
    pd.testing.assert_frame_equal(_predictions(replayed), _predictions(direct), check_exact=True)


def test_failed_checkpoint_write_is_one_clear_error(tmp_path, demo_tree, demo_index, monkeypatch):
    def disk_full(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 152250368")

    monkeypatch.setattr(saving, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match=r"could not write .*last\.pt .*free disk space .*rerun the same command"):
        _run(tiny_config(tmp_path, epochs=2), demo_tree, demo_index)  # last.pt after epoch 1 of 2
