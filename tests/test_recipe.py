"""The training recipe: fixed budget on every training patient or an epoch chosen on inner
validation, test-time views, loss parts in the history, TensorBoard scalars."""
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

import utils.engine.fold as fold_module
from backbones import build_model
from preprocess.augment import prepare_batch
from preprocess.dataset import ImageSource, fold_split
from tests.conftest import tiny_config, tiny_study
from utils.engine.train import predict


def test_test_time_views_are_the_mean_over_flips_and_the_turn(tmp_path):
    cfg = tiny_config(tmp_path, model="mmnet", image_size=32)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cache = np.random.default_rng(0).integers(0, 256, (6, 32, 49, 3), dtype=np.uint8)
    source = ImageSource(cache, "cpu")
    tuples = np.array([[0, 1, 2, 3], [4, 5, -1, 1]])
    images, mask = source.gather(tuples)
    with torch.no_grad():
        views = [torch.sigmoid(model(prepare_batch(images.flip(d) if d else images, model.norm_mean,
                                                   model.norm_std, None), mask).logits) for d in ((), (3,), (2,), (2, 3))]
    mean = torch.stack(views).mean(0).numpy()
    assert np.allclose(predict(model, source, tuples, 8, "none", tta=True)["prob"], mean, atol=1e-6)
    assert np.allclose(predict(model, source, tuples, 8, "none", tta=False)["prob"], views[0].numpy(), atol=1e-6)
    assert not np.allclose(views[0].numpy(), mean, atol=1e-6)  # the views do differ: the test can fail


def test_fixed_budget_trains_on_the_inner_validation_patients(tmp_path, demo_tree, demo_index):
    study = tiny_study(tiny_config(tmp_path), demo_tree, demo_index)
    held = fold_split(study.index, study.usable, study.folds, 0, tiny_config(tmp_path, model_selection="inner_val"))
    fixed = fold_split(study.index, study.usable, study.folds, 0, tiny_config(tmp_path, model_selection="last"))
    assert "val" not in fixed and len(held["val"]) > 0
    assert sorted(fixed["train"].patients) == sorted(held["train"].patients + held["val"].patients)
    assert fixed["test"].patients == held["test"].patients


@pytest.mark.parametrize("selection", ["last", "inner_val"])
def test_history_and_results_per_selection_rule(selection, tmp_path, demo_tree, demo_index):
    cfg = tiny_config(tmp_path, model_selection=selection, epochs=2)
    results = fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    history = pd.read_csv(tmp_path / "runs" / "mmnet" / "fold0" / "history.csv")
    parts = history["train_binary_loss"] + cfg.subtype_loss_weight * history["train_subtype_loss"]
    assert np.allclose(parts, history["train_loss"], rtol=1e-4)  # the total is what its parts say
    if selection == "last":
        assert results["best_epoch"] == 1 and results["val_threshold"] is None
        assert "val_loss" not in history and "val" not in results["patients"]
    else:
        assert {"val_loss", "val_auc"} <= set(history.columns) and 0 <= results["val_threshold"] <= 1


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_scalars_per_experiment_and_fold(tmp_path, demo_tree, demo_index):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, tensorboard=True, epochs=2)
    fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "mmnet" / "fold0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_binary_loss", "train_subtype_loss", "lr", "tuples_per_s"} <= tags
    assert [e.step for e in events.Scalars("train_binary_loss")] == [1, 2]
    assert json.loads((tmp_path / "runs" / "mmnet" / "fold0" / "results.json").read_text())["epochs_run"] == 2
