"""Experiments as configuration, statistics, tables, plots and the report."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from config import ABLATIONS, BASELINES, EXPERIMENTS, experiment_config
from tests.conftest import ROOT, tiny_config, tiny_study
from utils.report.statistics import bootstrap_ci, corrected_resampled_ttest


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_each_experiment_trains_one_step_on_demo_data(experiment, tmp_path, demo_tree, demo_index):
    import torch

    from preprocess.dataset import fold_split, training_samples
    from utils.engine.losses import StudyLoss
    from utils.engine.train import EpochPlan, LoopSettings, new_fold_state, train_one_epoch

    base = tiny_config(tmp_path)
    cfg = experiment_config(base, experiment)
    study = tiny_study(base, demo_tree, demo_index)
    split = fold_split(study.index, study.usable, study.folds, 0, cfg)
    state = new_fold_state(cfg, study.env, steps_per_epoch=1, seed=0)
    before = [p.detach().clone() for p in state.model.parameters()]
    tuples, owners = training_samples(split["train"], 8, np.random.default_rng(0), cfg)
    slots = 1 if cfg.model == "single" else cfg.bag_size if cfg.sample_mode == "bag" else 4
    assert tuples.shape == (8, slots)
    loop = LoopSettings(study.source, split["train"], StudyLoss(cfg, None), 8, "none", 1.0)
    result = train_one_epoch(state, loop, EpochPlan(tuples, owners, torch.Generator().manual_seed(0), 0))
    assert np.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    if experiment.startswith("single_"):  # only that magnification's images are drawn
        mag = int(experiment.removeprefix("single_").rstrip("x"))
        assert set(study.index["mag"].to_numpy()[tuples.ravel()]) == {mag}


def test_corrected_ttest_hand_computed():
    # d = .01..05: mean .03, var .00025; n_test/n_train = 1/4, k = 5:
    # t = .03 / sqrt((1/5 + 1/4) * .00025) = .03 / .0106066 = 2.828427
    t, p = corrected_resampled_ttest([0.01, 0.02, 0.03, 0.04, 0.05], n_train=4, n_test=1)
    assert t == pytest.approx(2.828427, abs=1e-6)
    assert p == pytest.approx(2 * scipy_stats.t.sf(2.828427, df=4), abs=1e-6)
    naive_t = 0.03 / np.sqrt(0.00025 / 5)
    assert t < naive_t  # the correction widens the interval
    assert corrected_resampled_ttest([0.0, 0.0, 0.0], 4, 1) == (0.0, 1.0)
    # the same non-zero difference in all 5 folds: the exact sign test, not "n/a"
    assert corrected_resampled_ttest([0.02] * 5, 4, 1)[1] == pytest.approx(2 * 0.5 ** 5)


def _pooled(seed=0, patients=30, tuples=6):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = int(p % 3 != 0)
        for _ in range(tuples):
            rows.append({"patient": f"p{p}", "group": str(p), "label": label, "threshold": 0.5,
                         "prob": float(np.clip(rng.normal(0.4 + 0.25 * label, 0.2), 0, 1))})
    return pd.DataFrame(rows)


def test_bootstrap_resamples_slide_groups_not_tuples():
    pooled = _pooled()
    doubled = pd.concat([pooled, pooled], ignore_index=True)  # every tuple twice
    for level in ("tuple", "patient"):
        a = bootstrap_ci(pooled, level, n_boot=300, seed=1)
        b = bootstrap_ci(doubled, level, n_boot=300, seed=1)
        for metric in a:
            assert a[metric] == pytest.approx(b[metric]), (level, metric)
    low, high = a["accuracy"][1:]
    assert low < a["accuracy"][0] < high


def _fake_run(out, experiment, folds=3, seed=0):
    rng = np.random.default_rng(seed)
    for fold in range(folds):
        rows = []
        for p in range(8):
            label = int(p % 2)
            for _ in range(3):
                w = rng.dirichlet(np.ones(4))
                rows.append({"patient": f"SOB_{fold}_{p}", "group": str(fold * 10 + p), "label": label,
                             "subtype": (p % 4) + 4 * label, "prob": float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2), 0, 1)),
                             **{f"p_sub_{i}": 1 / 8 for i in range(8)},
                             **{f"w_{m}x": w[i] for i, m in enumerate((40, 100, 200, 400))},
                             **{f"prob_without_{m}x": float(rng.random()) for m in (40, 100, 200, 400)}})
        frame = pd.DataFrame(rows)
        folder = out / "runs" / experiment / f"fold{fold}"
        folder.mkdir(parents=True)
        frame.to_csv(folder / "predictions.csv", index=False)
        pd.DataFrame({"epoch": [0, 1], "train_loss": [0.7, 0.5], "train_binary_loss": [0.6, 0.4],
                      "train_subtype_loss": [1.0, 0.9], "val_loss": [0.69, 0.6],
                      "val_auc": [0.7, 0.8]}).to_csv(folder / "history.csv", index=False)
        (folder / "results.json").write_text(json.dumps({
            "experiment": experiment, "fold": fold, "threshold": 0.5, "val_threshold": 0.4,
            "train_prevalence": 0.6, "best_epoch": 1, "epochs_run": 2,
            "train_seconds": 3.0, "pretrained": "random init", "patients": {"train": 20, "val": 5, "test": 8}}))


def test_report_only_rebuilds_everything_from_output(tmp_path):
    out = tmp_path / "output"
    for i, name in enumerate(EXPERIMENTS):
        _fake_run(out, name, seed=i)
    report = tmp_path / "REPORT.md"
    result = subprocess.run([sys.executable, "main.py", "--report-only", "--output-dir", str(out),
                             "--report-file", str(report), "--bootstrap-samples", "50"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for table in ("main_comparison", "main_comparison_tuple", "ablation", "per_fold", "subtype_recall",
                  "subtype_head", "magnification_importance"):
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{table}.{ext}").is_file(), (table, ext)
    for plot in ("confusion_matrices", "experiments_bar", "roc_mmnet", "training_curves_mmnet",
                 "calibration_mmnet", "magnification_importance_mmnet"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    main = pd.read_csv(out / "tables" / "main_comparison.csv")
    assert list(main["experiment"]) == ["mmnet", *BASELINES]
    assert list(pd.read_csv(out / "tables" / "ablation.csv")["experiment"]) == ["mmnet", *ABLATIONS]
    stats = pd.read_csv(out / "tables" / "statistics.csv")
    compared = stats[(stats["experiment"] != "mmnet") & stats["metric"].isin(["auc", "balanced_accuracy"])
                     & (stats["level"] == "patient")]
    assert len(compared) == 2 * (len(EXPERIMENTS) - 1) + 2  # mmnet_no_fusion: in the ablation and the fusion table
    assert sorted(compared.loc[compared["experiment"] == "mmnet_no_fusion", "family"]) == ["ablation"] * 2 + ["fusion"] * 2
    assert compared["p_value"].between(0, 1).all() and (compared["p_holm"] >= compared["p_value"] - 1e-12).all()
    assert (compared["diff_ci_low"] <= compared["diff_pooled"]).all() and (compared["diff_pooled"] <= compared["diff_ci_high"]).all()
    assert stats.loc[stats["level"] == "tuple", "p_value"].isna().all()  # samples of different size: no test
    assert "p=" not in (out / "tables" / "main_comparison_tuple.md").read_text()
    importance = pd.read_csv(out / "tables" / "magnification_importance.csv")
    assert list(importance.columns) == ["fold", "40X", "100X", "200X", "400X"]
    text = report.read_text()
    assert "Main comparison (patient level)" in text and "Ablations" in text and "Time per experiment" in text


def test_report_only_without_runs_says_what_to_do(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--report-only", "--output-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run `python main.py` first" in result.stdout + result.stderr
