"""The protocol a reviewer checks: subtype-stratified grouped folds, decisions and identity,
honest magnification importance, and statistics against oracles."""
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from config import Config, parse_args
from tests.conftest import DEMO_H, DEMO_W, ROOT, tiny_config, tiny_study
from utils.report.statistics import holm, paired_difference_ci, prior_corrected, wilson


def test_real_listing_folds_keep_every_subtype_in_training_and_both_classes_in_test(listing):
    from preprocess.preprocess import parse_name
    from preprocess.splits import build_folds

    index = pd.DataFrame([dict(path=f, **parse_name(f)) for f in listing["filename"]])
    folds = build_folds(index, 5, 42, 0.2)
    for fold in range(5):
        train, test = folds[folds["fold"] != fold], folds[folds["fold"] == fold]
        assert train["subtype"].nunique() == 8 and test["label"].nunique() == 2
        assert not set(train["group"]) & set(test["group"])


def test_folds_are_rebuilt_when_their_settings_change(demo_tree, demo_index, tmp_path):
    from utils.study.pipeline import _folds

    cfg = tiny_config(tmp_path)
    first = _folds(cfg, demo_index, demo_tree)
    assert json.loads((tmp_path / "folds.json").read_text())["seed"] == cfg.seed
    assert _folds(cfg, demo_index, demo_tree).equals(first)  # same settings: reused
    _folds(dataclasses.replace(cfg, seed=7), demo_index, demo_tree)
    assert json.loads((tmp_path / "folds.json").read_text())["seed"] == 7


def test_magnifications_run_from_low_to_high_whatever_the_flag_order():
    assert parse_args(["--magnifications", "400,40"]).magnifications == (40, 400)


def test_amp_and_weights_enter_the_run_identity():
    base = Config(amp="bfloat16", pretrained="on")
    assert dataclasses.replace(base, amp="float16").training_hash() != base.training_hash()
    assert dataclasses.replace(base, pretrained="off").training_hash() != base.training_hash()
    assert dataclasses.replace(base, micro_batch=4, device="cuda").training_hash() == base.training_hash()


@pytest.mark.parametrize("capability, expected", [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_bf16_only_where_tensor_cores_run_it(monkeypatch, capability, expected):
    from utils import device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert device.auto_amp("cuda") == expected and device.auto_amp("cpu") == "none"


def test_statistics_against_hand_cases():
    assert holm([0.01, 0.04, 0.03, np.nan]).round(6).tolist()[:3] == [0.03, 0.06, 0.06]
    low, high = wilson(16, 16)
    assert low == pytest.approx(0.8064, abs=1e-4) and high == 1.0  # the percentile bootstrap gives [1, 1]
    assert prior_corrected(np.array([0.5]), np.array([0.7]))[0] == pytest.approx(0.7)
    assert prior_corrected(np.array([0.8]), np.array([0.5]))[0] == pytest.approx(0.8)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"patient": [f"p{i}" for i in range(30)], "group": [str(i // 2) for i in range(30)],
                          "label": [int(i % 4 < 2) for i in range(30)], "threshold": 0.5})
    frame["prob"] = np.clip(0.3 + 0.4 * frame["label"] + rng.normal(0, 0.2, 30), 0, 1)
    same = paired_difference_ci(frame, frame, ["auc", "balanced_accuracy"], n_boot=200)
    assert same == {"auc": (0.0, 0.0, 0.0), "balanced_accuracy": (0.0, 0.0, 0.0)}
    worse = frame.assign(prob=frame["prob"] * 0.2 + 0.4 * rng.random(30))
    diff, low, high = paired_difference_ci(frame, worse, ["auc"], n_boot=500)["auc"]
    assert diff > 0 and low <= diff <= high


@pytest.fixture(scope="module")
def only_200x_carries_signal(tmp_path_factory):
    """Demo patients whose 40X, 100X and 400X images are one and the same benign picture:
    only 200X tells the classes apart."""
    from preprocess.demo import write_demo_tree
    from preprocess.preprocess import index_dataset

    root = tmp_path_factory.mktemp("only200")
    tree = write_demo_tree(root / "tree", width=DEMO_W, height=DEMO_H)
    template = sorted(tree.rglob("SOB_B_*-40-*.png"))[0].read_bytes()
    for path in tree.rglob("*.png"):
        if "-200-" not in path.name:
            path.write_bytes(template)
    index, _ = index_dataset(tree)
    # One informative magnification of four: it takes this budget to learn it (see test_interpret).
    cfg = tiny_config(root / "out", epochs=12, tuples_per_epoch=64, patience=20, lr=1e-3)
    study = tiny_study(cfg, tree, index)
    from utils.engine.fold import run_fold

    for fold in range(2):
        run_fold(cfg, study, "mmnet", fold)
    return root / "out"


def test_masking_the_only_informative_magnification_costs_the_most_auc(only_200x_carries_signal):
    from utils.report.tables import load_runs
    from utils.report.weights import magnification_importance

    table = magnification_importance(load_runs(only_200x_carries_signal, ["mmnet"])["mmnet"])
    folds = table[table["fold"] != "mean ± sd"].set_index("fold").astype(float)
    mean = folds.mean()
    assert mean["200X"] > 0.2 and mean["200X"] > 3 * max(abs(mean["40X"]), abs(mean["100X"]), abs(mean["400X"]), 0.02)


def test_report_numbers_are_traceable_to_the_predictions(only_200x_carries_signal, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(only_200x_carries_signal, out)
    result = subprocess.run([sys.executable, "main.py", "--report-only", "--output-dir", str(out),
                             "--report-file", str(tmp_path / "R.md"), "--bootstrap-samples", "200"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    frames = [pd.read_csv(p) for p in sorted((out / "runs/mmnet").glob("fold*/predictions.csv"))]
    patients = pd.concat(frames).groupby("patient").agg(label=("label", "first"), prob=("prob", "mean"))
    stats = pd.read_csv(out / "tables/statistics.csv").set_index(["experiment", "level", "metric"])
    assert stats.loc[("mmnet", "patient", "auc"), "pooled"] == pytest.approx(roc_auc_score(patients["label"], patients["prob"]), abs=1e-5)
    accuracy = ((patients["prob"] >= 0.5).astype(int) == patients["label"]).mean()
    assert stats.loc[("mmnet", "patient", "accuracy"), "pooled"] == pytest.approx(accuracy, abs=1e-5)
    per_fold = pd.read_csv(out / "tables/per_fold.csv")
    fold0 = frames[0].groupby("patient").agg(label=("label", "first"), prob=("prob", "mean"))
    assert per_fold.loc[per_fold["fold"] == 0, "auc"].item() == pytest.approx(roc_auc_score(fold0["label"], fold0["prob"]), abs=1e-4)


def test_cv_repeats_add_new_splits_and_keep_the_first_repetition(demo_index):
    from preprocess.splits import FoldError, assert_disjoint, build_folds, folds_fingerprint

    once = build_folds(demo_index, 2, 42, 0.2)
    twice = build_folds(demo_index, 2, 42, 0.2, repeats=2)
    assert [c for c in twice.columns if c.startswith("role_f")] == ["role_f0", "role_f1", "role_f2", "role_f3"]
    assert all(folds_fingerprint(once, j) == folds_fingerprint(twice, j) for j in (0, 1))
    assert not twice["fold_r1"].equals(twice["fold"])  # a new split, not a copy
    for j in range(4):  # every repetition tests each patient once
        assert (twice[f"role_f{j}"] == "test").sum() > 0
    assert ((twice["role_f2"] == "test") | (twice["role_f3"] == "test")).all()
    broken = twice.copy()
    broken.loc[broken.index[0], "role_f3"] = "train" if broken.loc[broken.index[0], "role_f3"] == "test" else "test"
    with pytest.raises(FoldError, match="role_f3"):  # the one split that was broken
        assert_disjoint(broken)


def test_adding_repeats_keeps_the_finished_folds_identity():
    """--cv-repeats 3 after --cv-repeats 1: the first repeat's folds stay finished (each fold's own
    split is checked by its folds hash); a training setting still changes the identity."""
    from config import Config

    assert Config(cv_repeats=1).training_hash() == Config(cv_repeats=3).training_hash()
    assert Config(epochs=1).training_hash() != Config(epochs=2).training_hash()
