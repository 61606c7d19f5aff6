"""What a run writes for people and scripts: config.yaml and its validation, progress and
ETA, booktabs LaTeX, report locations."""
import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pandas as pd
import pytest

import config
from config import ConfigError, parse_args, write_config_file


def test_config_file_round_trip_gives_the_same_run(tmp_path):
    cfg = parse_args(["--dry-run", "--experiments", "mmnet,single_40x", "--lr", "0.002",
                      "--magnifications", "100,40", "--output-dir", str(tmp_path / "out")])
    write_config_file(cfg, tmp_path / "config.yaml")
    again = parse_args(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg and again.training_hash() == cfg.training_hash()
    assert parse_args(["--config", str(tmp_path / "config.yaml"), "--lr", "0.01"]).lr == 0.01  # flags win


def test_every_problem_is_one_coded_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 0\nloss: focl\nexperiments: [mmnet, singel_40x]\nmagnifications: [40, 50]\n")
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", str(path)])
    lines = str(caught.value).splitlines()
    assert [line[:8] for line in lines] == ["[CFG003]", "[CFG004]", "[CFG005]", "[CFG008]"]
    assert "did you mean 'focal'" in lines[1] and "did you mean 'single_40x'" in lines[2]
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"\[CFG007\]"):
        parse_args(["--config", str(path)])
    path.write_text("lr: fast\nbatch_size: 2.5\n")
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", str(path)])
    assert str(caught.value).count("[CFG002]") == 2


def test_missing_tensorboard_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"\[CFG009\] tensorboard: .*pip install tensorboard"):
        parse_args(["--tensorboard"])


def test_report_only_reads_the_runs_own_settings(tmp_path):
    out = tmp_path / "out"
    write_config_file(parse_args(["--output-dir", str(out), "--bootstrap-samples", "321", "--seed", "7"]),
                      out / config.CONFIG_FILE)
    rebuilt = parse_args(["--report-only", "--output-dir", str(out)])
    assert (rebuilt.bootstrap_samples, rebuilt.seed, rebuilt.report_only) == (321, 7, True)
    assert parse_args(["--report-only", "--output-dir", str(out), "--seed", "8"]).seed == 8


def test_dry_run_never_writes_into_the_full_runs_folder():
    full, dry = parse_args([]), parse_args(["--dry-run"])
    assert dry.output_dir != full.output_dir and dry.output_dir.startswith(full.output_dir)


def test_report_paths_root_copy_only_for_a_full_default_run(tmp_path):
    from utils.env import PROJECT_ROOT
    from utils.report.build import report_paths

    assert (PROJECT_ROOT / "RUNPOD_OUTPUT.md").resolve() in report_paths(parse_args([]))
    dry = report_paths(parse_args(["--dry-run"]))
    assert len(dry) == 1 and dry[0].parent.name == "dry_run"
    custom = report_paths(parse_args(["--output-dir", str(tmp_path)]))
    assert custom == [(tmp_path / "RUNPOD_OUTPUT.md").resolve()]


def test_progress_eta_follows_measured_speed(tmp_path, monkeypatch):
    from utils.study import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    jobs = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    tracker = progress.StudyProgress(tmp_path, jobs, {"a": 10.0, "b": 30.0})
    assert tracker.eta_seconds() == pytest.approx(80.0)  # nothing measured yet: the prediction
    tracker.start_job("a", 0)
    clock[0] += 20.0  # the first job takes twice its prediction
    tracker.end_job("a", 0, True)
    assert tracker.eta_seconds() == pytest.approx(2 * 70.0)
    tracker.end_job("a", 1, False)  # finished earlier: costs nothing, teaches nothing
    assert tracker.eta_seconds() == pytest.approx(2 * 60.0)
    tracker.start_job("b", 0)
    clock[0] += 30.0
    tracker.epoch_done("b", 0, 0, 2)  # half of b0 in 30 s: 50 s for 25 s predicted so far
    info = json.loads((tmp_path / "progress.json").read_text())
    assert info["job"] == 3 and info["jobs"] == 4 and info["experiment"] == "b"
    assert info["eta_s"] == pytest.approx(2 * (15.0 + 30.0), abs=0.2)


def test_progress_eta_of_parallel_workers_uses_their_own_job_times(tmp_path, monkeypatch):
    from utils.study import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    jobs = [("a", f) for f in range(5)]
    tracker = progress.StudyProgress(tmp_path, jobs, {"a": 10.0}, workers=2)
    assert tracker.eta_seconds() == pytest.approx(25.0)  # 5 jobs of 10 s on 2 workers
    tracker.end_job("a", 0, False)  # finished earlier, never sent to a worker
    clock[0] += 500.0  # the parent's clock means nothing for a worker's job
    tracker.end_job("a", 1, True, seconds=30.0)  # the worker took 3x the prediction
    assert tracker.eta_seconds() == pytest.approx(3 * 30.0 / 2)


def test_latex_tables_compile_ready(tmp_path):
    from utils.files import save_table

    table = pd.DataFrame({"experiment": ["mmnet", "single_40x"], "acc": ["0.9 [0.8, 0.95]", "0.5 ± 0.1"],
                          **{f"m{i}": ["Δ 0.1", "1 & 2"] for i in range(7)}})
    save_table(table, tmp_path, "main_comparison", latex=True, caption="Main comparison (95 % CI, patient_level)")
    tex = (tmp_path / "main_comparison.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert tex.count("\\begin{table}") == 2 and "\\label{tab:main-comparison-2}" in tex  # split to fit a page
    assert "95 \\% CI, patient\\_level" in tex and "single\\_40x" in tex and "1 \\& 2" in tex
    assert all(ord(c) < 128 for c in tex)  # no raw Unicode for pdflatex


def test_subtype_balanced_accuracy_without_warnings():
    from sklearn.metrics import balanced_accuracy_score

    from utils.metrics import subtype_metrics

    truth = np.array([0, 0, 1, 1, 4, 4])
    probs = np.eye(8)[[0, 5, 1, 1, 4, 7]]  # predicts classes that never occur
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = subtype_metrics(truth, probs)["subtype_balanced_accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == pytest.approx(balanced_accuracy_score(truth, probs.argmax(1)))


def test_config_fields_all_have_help_text():
    from utils.config_file import field_comments

    comments = field_comments(config.Config)
    missing = [f.name for f in dataclasses.fields(config.Config) if f.name not in comments]
    assert not missing
