"""What a new user meets first: the first error names the first problem, one estimate of the
study's length, curves for the run's own reference, a sample grid of the data as it is, an
honest ETA after a resume."""
import pytest


def test_a_missing_data_folder_is_named_before_the_device_is_checked(monkeypatch, capsys, tmp_path):
    import main

    def no_device_check(cfg):
        raise AssertionError("the device was checked before the data folder")

    monkeypatch.setattr(main, "settle_device", no_device_check)
    code = main.main(["--data-dir", str(tmp_path / "nonexistent"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no BreakHis images found in '{tmp_path / 'nonexistent'}'" in err
    assert "CUDA" not in err


def test_a_folder_without_images_is_not_data(tmp_path):
    from preprocess.preprocess import holds_images

    (tmp_path / "notes.txt").write_text("x")
    assert not holds_images(tmp_path) and not holds_images(tmp_path / "missing")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "SOB_B_A-14-22549AB-200-001.JPG").write_bytes(b"")
    assert holds_images(tmp_path)  # any image suffix, any case, any depth


def test_start_up_estimate_and_benchmark_are_one_function(monkeypatch, tmp_path):
    """Given the same measured loop rates, the start-up check and `python -m utils.benchmark`
    predict the same minutes for the same study: they share loop_rates and study_minutes."""
    import pandas as pd

    from utils.device import detect_env
    from utils.study import benchmark

    fixed = {"train_tuples_per_s_end_to_end": 3.0, "eval_tuples_per_s": 11.0}
    seen = []
    monkeypatch.setattr(benchmark, "loop_rates", lambda state, loop, batches: seen.append(batches) or dict(fixed))
    from config import Config

    cfg = Config(backbone="test_resnet", image_size=32, pretrained="off", device="cpu")  # as the benchmark builds it
    quick = benchmark.quick_study_minutes(cfg, detect_env(cfg))
    assert benchmark.main(["--backbone", "test_resnet", "--image-size", "32", "--device", "cpu", "--batches", "1",
                           "--cache-images", "0", "--output-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "tables" / "benchmark.csv").set_index("metric")["value"]
    assert table["host_syncs_per_step"] == 0  # the device-resident training step never waits on the host
    assert table["ops_per_step"] > table["ops_per_step_single_image"] > 0 and table["ops_per_patient"] > 0
    for row in ("decode_ms_per_image", "model_ms_per_patient_1_models", "model_ms_per_patient_5_models",
                "model_ms_per_patient_5_models_H100_predicted", "fold_build_s", "fold_end_write_s"):
        assert table[row] > 0, row
    assert len(seen) == 2 and quick > 0
    assert table["predicted_full_run_minutes"] == pytest.approx(quick, rel=1e-3)
    assert quick == pytest.approx(benchmark.study_minutes(cfg, fixed))


def test_eta_after_a_resume_is_the_remaining_jobs_predicted_time(tmp_path, monkeypatch):
    """A resumed study: finished folds are skipped, the stopped fold resumes at epoch 6 of 8.
    Trained at the predicted pace, the ETA is the remaining jobs' predicted time, not half of it."""
    from utils.study import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    jobs = [("a", f) for f in range(6)]
    tracker = progress.StudyProgress(tmp_path, jobs, {"a": 80.0})
    for fold in (0, 1):
        tracker.end_job("a", fold, False)  # finished before the stop
    tracker.start_job("a", 2, 6 / 8)  # resumed at epoch 6 of 8: a quarter of the job is left
    clock[0] += 20.0  # the rest took its predicted 20 s
    tracker.epoch_done("a", 2, 7, 8)
    tracker.end_job("a", 2, True)
    assert tracker.eta_seconds() == pytest.approx(3 * 80.0)  # three untouched folds, at pace 1


def test_eta_of_a_resumed_job_in_a_worker_counts_only_its_own_part(tmp_path, monkeypatch):
    from utils.study import progress

    monkeypatch.setattr(progress.time, "perf_counter", lambda: 100.0)
    tracker = progress.StudyProgress(tmp_path, [("a", f) for f in range(3)], {"a": 80.0}, workers=1)
    tracker.end_job("a", 0, True, seconds=40.0, share=0.5)  # half of the job, at the predicted pace
    assert tracker.eta_seconds() == pytest.approx(2 * 80.0)


def test_sample_grid_has_one_column_per_magnification_present(tmp_path, demo_index, demo_tree):
    from PIL import Image

    from preprocess.analyze import analyze

    full = analyze(demo_index, demo_tree, tmp_path / "all")
    only = analyze(demo_index[demo_index["mag"] == 200], demo_tree, tmp_path / "200x")
    assert full is not None and only is not None
    wide = Image.open(tmp_path / "all" / "plots" / "sample_grid.png").size[0]
    narrow = Image.open(tmp_path / "200x" / "plots" / "sample_grid.png").size[0]
    assert narrow < wide / 2  # one column, not four with three blank


def test_curves_are_drawn_for_the_reference_experiment_of_the_run():
    from config import parse_args
    from utils.report.build import reference_experiment

    runs = {"single_40x": {}, "single_200x": {}}
    assert reference_experiment(parse_args(["--experiments", "single_200x,single_40x"]), runs) == "single_200x"
    assert reference_experiment(parse_args([]), {"mmnet": {}, **runs}) == "mmnet"


def test_a_run_without_mmnet_draws_the_curves_of_its_own_experiment(tmp_path, demo_tree):
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "output"
    result = subprocess.run([sys.executable, "main.py", "--dry-run", "--experiments", "single_200x", "--backbone",
                             "test_resnet", "--gradcam-patients", "0", "--no-live-report", "--output-dir", str(out),
                             "--data-dir", str(demo_tree)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for kind in ("roc", "calibration", "training_curves"):
        assert (out / "plots" / f"{kind}_single_200x.png").is_file(), kind
    assert "the reference experiment of this run" in (out / "RUNPOD_OUTPUT.md").read_text()
