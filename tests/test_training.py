"""The training loop: determinism, resume, refusal of foreign checkpoints, learning."""
import dataclasses

import pandas as pd
import pytest
import torch

import utils.engine.fold as fold_module
import utils.engine.train as train
from tests.conftest import tiny_config, tiny_study
from utils.engine.checkpoint import ForeignRunError
from utils.engine.saving import load_checkpoint
from utils.metrics import fold_metrics


def _run(cfg, demo_tree, demo_index, fold=0, experiment="mmnet"):
    return fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), experiment, fold)


def _interrupt_in_epoch(monkeypatch, epoch: int):
    """Make training raise KeyboardInterrupt when `epoch` starts; returns the real function."""
    real_epoch = fold_module.train_one_epoch

    def interrupted(state, loop, plan):
        if plan.epoch == epoch:
            raise KeyboardInterrupt  # as if the pod stopped mid-run
        return real_epoch(state, loop, plan)

    monkeypatch.setattr(fold_module, "train_one_epoch", interrupted)
    return real_epoch


def _predictions(cfg, fold=0):
    return pd.read_csv(f"{cfg.output_dir}/runs/mmnet/fold{fold}/predictions.csv")


def test_two_identical_runs_give_identical_predictions(tmp_path, demo_tree, demo_index):
    a, b = tiny_config(tmp_path / "a"), tiny_config(tmp_path / "b")
    _run(a, demo_tree, demo_index)
    _run(b, demo_tree, demo_index)
    pd.testing.assert_frame_equal(_predictions(a), _predictions(b), check_exact=True)
    history = pd.read_csv(tmp_path / "a/runs/mmnet/fold0/history.csv")
    assert list(history["epoch"]) == [0, 1]


def test_resumed_run_matches_uninterrupted(tmp_path, demo_tree, demo_index, monkeypatch):
    whole = tiny_config(tmp_path / "whole", epochs=3)
    _run(whole, demo_tree, demo_index)

    cut = tiny_config(tmp_path / "cut", epochs=3)
    real_epoch = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(cut, demo_tree, demo_index)
    assert load_checkpoint(tmp_path / "cut/runs/mmnet/fold0/last.pt")["epoch"] == 1
    assert not (tmp_path / "cut/runs/mmnet/fold0/results.json").exists()
    monkeypatch.setattr(fold_module, "train_one_epoch", real_epoch)
    _run(cut, demo_tree, demo_index)
    pd.testing.assert_frame_equal(_predictions(whole), _predictions(cut), check_exact=True)
    assert len(pd.read_csv(tmp_path / "cut/runs/mmnet/fold0/history.csv")) == 3


def test_finished_fold_is_skipped_and_foreign_config_refused(tmp_path, demo_tree, demo_index, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=1)
    first = _run(cfg, demo_tree, demo_index)
    monkeypatch.setattr(fold_module, "train_one_epoch", lambda *a, **k: pytest.fail("retrained a finished fold"))
    assert _run(cfg, demo_tree, demo_index) == first
    with pytest.raises(ForeignRunError, match="--no-resume"):
        _run(dataclasses.replace(cfg, lr=5e-4), demo_tree, demo_index)


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path, demo_tree, demo_index, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    real_epoch = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, demo_tree, demo_index)
    folder = tmp_path / "runs/mmnet/fold0"
    last = torch.load(folder / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_auc", "config_hash"):
        assert key in last
    assert last["config_hash"] == cfg.training_hash() and last["epoch"] == 1
    assert {"torch", "numpy_key", "numpy_rest"} <= set(last["rng"])
    assert not list(folder.glob("*.tmp"))
    monkeypatch.setattr(fold_module, "train_one_epoch", real_epoch)
    _run(cfg, demo_tree, demo_index)
    assert not (folder / "last.pt").exists()  # finished: only the model is kept
    best = torch.load(tmp_path / "models" / "mmnet" / "fold0.pt", weights_only=True)
    assert "config_json" in best and set(best["model"]) == set(last["model"])


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path, demo_tree, demo_index, monkeypatch):
    from utils.engine import losses

    calls = []

    def nan_loss(self, output, labels, subtypes, step=None):
        calls.append(len(labels))
        return output.logits.sum() * float("nan"), {}

    monkeypatch.setattr(losses.StudyLoss, "__call__", nan_loss)
    with pytest.raises(train.TrainingError, match=r"non-finite loss at epoch 0 step 0"):
        _run(tiny_config(tmp_path), demo_tree, demo_index)
    assert calls  # the loop called the patched loss: the error comes from its NaN


def test_learns_demo_signal(tmp_path, demo_tree, demo_index):
    """Out-of-fold patient ranking and accuracy over both folds of the 16 demo patients.

    The synthetic signal (nuclear density and darkness) survives resizing to 48 px, and a
    few epochs separate it almost perfectly. The bar, 12 of 16 patients, has a probability
    of 0.038 under coin-flipping, so passing it means the pipeline learned. Four short epochs
    rank the patients right but leave the probabilities on one side of 0.5 (uncalibrated), so
    the count uses the threshold chosen on inner-validation patients (held out for it here).
    """
    cfg = tiny_config(tmp_path, epochs=4, tuples_per_epoch=64, model_selection="inner_val")
    correct = 0
    for fold in range(2):
        result = _run(cfg, demo_tree, demo_index, fold=fold)
        m = fold_metrics(_predictions(cfg, fold), result["val_threshold"])["patient"]
        assert m["auc"] >= 0.9
        correct += round(m["accuracy"] * m["n"])
    assert correct >= 12


def test_resume_reads_checkpoints_on_the_cpu(tmp_path, demo_tree, demo_index, monkeypatch):
    """RNG states must be CPU tensors for torch.set_rng_state, whatever device trains."""
    cfg = tiny_config(tmp_path, epochs=2)
    real_epoch = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, demo_tree, demo_index)
    monkeypatch.setattr(fold_module, "train_one_epoch", real_epoch)
    import utils.engine.checkpoint as checkpoint

    locations, original = [], checkpoint.load_checkpoint

    def recording(path, map_location="cpu"):
        locations.append(map_location)
        return original(path, map_location)

    monkeypatch.setattr(checkpoint, "load_checkpoint", recording)
    _run(cfg, demo_tree, demo_index)
    assert locations and set(locations) == {"cpu"}


def test_moving_average_follows_its_formula():
    """--ema-epochs 2 over 2 steps an epoch: decay 1 - 1/4; the first update copies the weights."""
    model = torch.nn.Linear(3, 1)
    average = train.moving_average(model, ema_epochs=2.0, steps_per_epoch=2)
    assert train.moving_average(model, 0.0, 2) is None
    expected = None
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(torch.full_like(model.weight, step + 1.0))
        average.update_parameters(model)
        current = model.weight.detach().clone()
        expected = current if expected is None else 0.75 * expected + 0.25 * current
    assert torch.allclose(average.module.weight, expected, atol=1e-6)
    assert not torch.allclose(average.module.weight, model.weight)  # the average lags: the test can fail
    from utils.engine.checkpoint import FoldState, tested_model
    assert tested_model(FoldState(model, None, None, None, average=average)) is average.module
    assert tested_model(FoldState(model, None, None, None)) is model


def test_moving_average_is_kept_and_resumes_exactly(tmp_path, demo_tree, demo_index, monkeypatch):
    whole = tiny_config(tmp_path / "whole", epochs=2, ema_epochs=1.0)
    _run(whole, demo_tree, demo_index)
    cut = tiny_config(tmp_path / "cut", epochs=2, ema_epochs=1.0)
    real_epoch = _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(cut, demo_tree, demo_index)
    saved = load_checkpoint(tmp_path / "cut/runs/mmnet/fold0/last.pt")
    name = next(k for k, v in saved["model"].items() if v.is_floating_point() and "weight" in k)
    assert not torch.equal(saved["average"][f"module.{name}"], saved["model"][name])  # tracked on its own
    monkeypatch.setattr(fold_module, "train_one_epoch", real_epoch)
    _run(cut, demo_tree, demo_index)
    pd.testing.assert_frame_equal(_predictions(whole), _predictions(cut), check_exact=True)


def test_a_checkpoint_of_the_branch_by_branch_layout_restarts_its_fold(tmp_path, demo_tree, demo_index, monkeypatch,
                                                                      caplog):
    """last.pt written while MMNet ran its encoders one by one (before they ran side by side) holds
    an optimizer over other parameters: the fold starts again, said once, and ends as a run that
    was never interrupted."""
    whole = tiny_config(tmp_path / "whole", epochs=2)
    _run(whole, demo_tree, demo_index)
    cut = tiny_config(tmp_path / "cut", epochs=2)
    _interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(dataclasses.replace(cut, grouped_branches="off"), demo_tree, demo_index)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut/runs/mmnet/fold0/last.pt")["epoch"] == 1
    with caplog.at_level("WARNING", logger="mmnet"):
        _run(cut, demo_tree, demo_index)
    assert "this fold starts again" in caplog.text
    pd.testing.assert_frame_equal(_predictions(whole), _predictions(cut), check_exact=True)
