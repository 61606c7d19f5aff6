"""--cuda-graphs: what makes capture impossible (said in one line), the static shapes (epochs of
whole batches), and the recorded update run through the eager stand-in recorder on the CPU: a
fold trained through it (warm-up, capture, replays with the schedule's learning rates reaching
the recording through device tensors) predicts what the eager fold predicts."""
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import utils.engine.fold as fold_module
import utils.engine.graphs as graphs
from tests.conftest import tiny_config, tiny_study
from tests.test_host_syncs import count_in_steps, resident_study
from utils.engine.fold import run_fold


def test_capture_is_refused_with_the_reason():
    assert graphs.graph_blocker("off", "cpu", "none", 1) == ""
    assert "CUDA device" in graphs.graph_blocker("on", "cpu", "none", 1)
    assert "loss scaler" in graphs.graph_blocker("on", "cuda", "float16", 1)
    assert "2 micro-batches" in graphs.graph_blocker("on", "cuda", "bfloat16", 2)
    assert graphs.graph_blocker("on", "cuda", "bfloat16", 1) in ("", graphs.graph_blocker("on", "cuda", "none", 1))


def test_an_old_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.1.2+cu121")
    assert "2.2" in graphs.graph_blocker("on", "cuda", "bfloat16", 1)


@pytest.mark.parametrize(("count", "expected"), [(1, 32), (32, 32), (33, 64), (96, 96)])
def test_an_epoch_is_whole_batches(count, expected):
    assert graphs.whole_batches(count, 32) == expected


def test_a_call_of_another_shape_runs_eagerly_and_the_recording_is_kept():
    calls = []

    def double(x):
        calls.append(tuple(x.shape))
        return x * 2

    step = graphs.GraphedStep(double, None, graphs.EagerRecorder())
    for _ in range(graphs.GRAPH_WARMUP_STEPS + 2):
        out = step(torch.ones(4))
    assert torch.equal(out, torch.full((4,), 2.0)) and step.static is not None
    recorded = step.static[0]
    assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))  # a short batch: eager
    assert step.static[0] is recorded
    assert torch.equal(step(torch.full((4,), 3.0)), torch.full((4,), 6.0))  # copied into the static input
    assert torch.equal(recorded, torch.full((4,), 3.0))


def _fold(tmp_path, demo_tree, demo_index, monkeypatch, graphed: bool):
    """One fold of MMNet with a warm-up schedule (the learning rate changes every step), 24
    steps of whole batches, through the recorded update or eagerly."""
    cfg = tiny_config(tmp_path / ("graphed" if graphed else "eager"), epochs=3, tuples_per_epoch=64,
                      warmup_epochs=2.0, cuda_graphs="on" if graphed else "off")
    recorders = []
    if graphed:  # the CPU stands in for CUDA: the eager recorder
        monkeypatch.setattr(fold_module, "graph_blocker", lambda *args: "")
        real = graphs.EagerRecorder

        def recorder(device):
            recorders.append(real())
            return recorders[-1]
        monkeypatch.setattr("utils.engine.train.new_recorder", recorder)
    run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    return pd.read_csv(tmp_path / ("graphed" if graphed else "eager") / "runs" / "mmnet" / "fold0" / "predictions.csv"), recorders


def test_a_fold_through_the_recorded_update_predicts_what_the_eager_fold_predicts(tmp_path, demo_tree, demo_index,
                                                                                monkeypatch):
    eager, _ = _fold(tmp_path, demo_tree, demo_index, monkeypatch, graphed=False)
    graphed, recorders = _fold(tmp_path, demo_tree, demo_index, monkeypatch, graphed=True)
    assert len(recorders) == 1 and recorders[0].fn is not None  # one recording for the fold, captured
    assert len(eager) == len(graphed) and list(eager["patient"]) == list(graphed["patient"])
    # Not bit for bit: the recorded optimizer reads the learning rate as a float32 tensor (its
    # rounding, ~1e-8 a step, grows to ~3e-3 over 24 steps); a learning rate left at the
    # value of capture (the schedule not reaching the recording) moves them by ~0.07.
    assert np.abs(graphed["prob"] - eager["prob"]).max() < 0.01
    assert not np.allclose(eager["prob"], 0.5)  # the fold learned something to compare


def test_the_recorded_update_reads_nothing_from_the_device(tmp_path, demo_tree, demo_index, monkeypatch):
    monkeypatch.setattr(fold_module, "graph_blocker", lambda *args: "")
    cfg = tiny_config(tmp_path, epochs=1, tuples_per_epoch=48, cuda_graphs="on")
    seen = count_in_steps(monkeypatch, cfg, resident_study(cfg, demo_tree, demo_index), "mmnet")
    assert seen["steps"] == 6 and seen["train"] == {}, seen


def test_the_reason_is_said_once_per_fold_and_the_fold_trains(tmp_path, demo_tree, demo_index, caplog):
    cfg = tiny_config(tmp_path, epochs=1, tuples_per_epoch=20, cuda_graphs="on")
    with caplog.at_level(logging.INFO, logger="mmnet"):
        run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    lines = [r.getMessage() for r in caplog.records if "--cuda-graphs on" in r.getMessage()]
    assert lines == ["mmnet fold 0: --cuda-graphs on, trained without graphs: CUDA graphs need a CUDA device (this run: cpu)"]
    assert (tmp_path / "runs" / "mmnet" / "fold0" / "predictions.csv").is_file()


def test_a_restored_optimizer_drops_the_recording():
    from utils.engine.checkpoint import FoldState, restore

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = FoldState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), history=[])
    state.graphed = object()
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "scaler": state.scaler.state_dict(), "epoch": 1, "best_auc": 0.5, "best_loss": 1.0, "best_epoch": 0,
               "bad_epochs": 0, "history": [], "step": 0, "partial_losses": None,
               "rng": {"torch": torch.get_rng_state(), "numpy_key": torch.zeros(624, dtype=torch.int64),
                       "numpy_rest": (0, 0, 0.0)}}
    restore(state, payload, None)
    assert state.graphed is None


def test_a_graphed_step_launches_what_runs_outside_the_recording_and_one_graph(tmp_path, monkeypatch):
    """step_counts(graphed=True), the benchmark's ops_per_step_graphed: a bare dispatch mode nested
    in the same steps after warm-up and capture sees every operator but the recorded update's
    (the replay runs out of every mode's sight), and the count adds the graph's one launch."""
    from config import experiment_config
    from tests.test_host_syncs import EveryCall, steps_under_oracle
    from utils.device import detect_env
    from utils.study.benchmark import synthetic_study
    from utils.study.rates import step_counts

    steps = steps_under_oracle(monkeypatch, skipped=graphs.GRAPH_WARMUP_STEPS + 1)  # warm-up and capture left out
    cfg = experiment_config(tiny_config(tmp_path), "mmnet")
    state, loop, _ = synthetic_study(cfg, detect_env(cfg), batches=1)
    eager = step_counts(state, loop)["ops_per_step"]
    steps[:], EveryCall.calls = [], 0
    graphed = step_counts(state, loop, graphed=True)
    assert graphed["ops_per_step"] == EveryCall.calls / 2 + 1
    assert graphed["host_syncs_per_step"] == 0
    assert 1 < graphed["ops_per_step"] < eager / 4  # the forward, backward and optimizer are one launch


def test_an_evaluation_padded_to_whole_batches_scores_exactly_the_real_tuples(tmp_path, demo_tree, demo_index):
    """predict(static=True), the CUDA default: the last batch filled with copies of the first
    tuple so every batch has one shape; the copies' outputs are dropped, the rest is unchanged."""
    from preprocess.dataset import evaluation_tuples, fold_split
    from utils.device import detect_env
    from utils.engine.train import new_fold_state, padded, predict

    assert padded(np.arange(10).reshape(5, 2), 4).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 1], [0, 1], [0, 1]]
    cfg = tiny_config(tmp_path)
    study = tiny_study(cfg, demo_tree, demo_index)
    state = new_fold_state(cfg, detect_env(cfg), steps_per_epoch=1, seed=0)
    tuples, _ = evaluation_tuples(fold_split(study.index, study.usable, study.folds, 0, cfg)["test"])
    assert len(tuples) % 7  # a short last batch
    plain = predict(state.model, study.source, tuples, 7, "none", tta=True, static=False)
    static = predict(state.model, study.source, tuples, 7, "none", tta=True, static=True)
    assert set(plain) == set(static)
    for key in plain:
        assert static[key].shape == plain[key].shape
        np.testing.assert_allclose(static[key], plain[key], atol=1e-5)


class AliasingRecorder(graphs.EagerRecorder):
    """The eager stand-in with a CUDA graph's output semantics: every replay writes into the
    tensors of the first one and returns those same tensors, so code that kept a previous
    replay's outputs sees them overwritten, as on CUDA."""

    def __init__(self):
        super().__init__()
        self.outputs, self.replays = None, 0

    def replay(self):
        fresh, self.replays = super().replay(), self.replays + 1
        if self.outputs is None:
            self.outputs = fresh
        for field in dataclasses.fields(fresh):
            value = getattr(fresh, field.name)
            if isinstance(value, torch.Tensor):
                getattr(self.outputs, field.name).copy_(value)
        return self.outputs


def _evaluation_model(tmp_path, demo_tree, demo_index):
    from preprocess.dataset import evaluation_tuples, fold_split
    from utils.device import detect_env
    from utils.engine.train import new_fold_state

    cfg = tiny_config(tmp_path)
    study = tiny_study(cfg, demo_tree, demo_index)
    state = new_fold_state(cfg, detect_env(cfg), steps_per_epoch=1, seed=0)
    tuples, _ = evaluation_tuples(fold_split(study.index, study.usable, study.folds, 0, cfg)["test"])
    return cfg, study, state.model.eval(), tuples


def test_a_recorded_evaluation_predicts_what_the_eager_one_predicts(tmp_path, demo_tree, demo_index):
    """predict(graphs=True): padded batches of one shape, the forward recorded after the warm-up
    calls and replayed for the later batches, its outputs overwritten by each replay (the
    stand-in does what a CUDA graph does); every tuple's outputs are the eager ones."""
    from utils.engine.train import predict

    _, study, model, tuples = _evaluation_model(tmp_path, demo_tree, demo_index)
    batch = 5  # 24 tuples: 5 batches, the last of 4
    assert len(tuples) > (graphs.GRAPH_WARMUP_STEPS + 1) * batch and len(tuples) % batch  # 2 replays, a short last batch
    recorders = []
    with graphs.evaluation_recorder(lambda device: recorders.append(AliasingRecorder()) or recorders[-1]):
        recorded = predict(model, study.source, tuples, batch, "none", tta=True, graphs=True)
    plain = predict(model, study.source, tuples, batch, "none", tta=True, static=False)
    assert len(recorders) == 1 and recorders[0].replays == -(-len(tuples) // batch) - graphs.GRAPH_WARMUP_STEPS
    assert set(recorded) == set(plain)
    for key in plain:
        assert recorded[key].shape == plain[key].shape
        np.testing.assert_allclose(recorded[key], plain[key], atol=1e-5)


@pytest.mark.parametrize(("count", "bucket"), [(1, 16), (16, 16), (17, 32), (100, 128)])
def test_a_patient_is_padded_to_a_power_of_two_bucket(count, bucket):
    assert graphs.graph_bucket(count) == bucket


def test_the_predictor_records_one_forward_per_bucket_and_scores_each_patient_as_eagerly(tmp_path, demo_tree,
                                                                                       demo_index):
    """FoldModel.predict(graphs=True), predict.py --cuda-graphs on: patients of 10, 13, 5 and 20
    tuples; the first three share the 16-tuple recording, the fourth gets a 32-tuple one; each
    patient's outputs are its own tuples' eager outputs (the padding dropped)."""
    from utils.engine.inference import FoldModel

    cfg, study, model, tuples = _evaluation_model(tmp_path, demo_tree, demo_index)
    fold_model = FoldModel(model, cfg, 0.5, Path("fold0.pt"))
    sizes = [10, 13, 5, 10, 13, 5, 20]
    assert len(tuples) >= max(sizes)
    recorders = []
    with graphs.evaluation_recorder(lambda device: recorders.append(AliasingRecorder()) or recorders[-1]):
        recorded = [fold_model.predict(study.source, tuples[:n], "none", graphs=True) for n in sizes]
    assert len(recorders) == 2 and recorders[0].replays == len(sizes) - 1 - graphs.GRAPH_WARMUP_STEPS
    for n, out in zip(sizes, recorded):
        plain = fold_model.predict(study.source, tuples[:n], "none")
        for key in plain:
            assert out[key].shape == plain[key].shape
            torch.testing.assert_close(out[key], plain[key], atol=1e-5, rtol=0)


def test_a_recorded_patient_launches_a_fraction_of_the_eager_one(tmp_path, demo_tree, demo_index):
    """The benchmark's ops_per_patient_graphed: what runs outside the recording (the views, the
    input copy, the means, the copy to the host) and one launch."""
    from utils.device import HostSyncCounter
    from utils.engine.inference import FoldModel, predict_patient
    from utils.study.rates import graphed_patient_ops

    cfg, study, model, tuples = _evaluation_model(tmp_path, demo_tree, demo_index)
    cache = np.asarray(study.source.images)[:12]
    by_mag = {m: list(range(3 * i, 3 * i + 3)) for i, m in enumerate(cfg.magnifications)}
    fold_model = FoldModel(model, cfg, 0.5, Path("fold0.pt"))
    with HostSyncCounter() as counter:
        predict_patient([fold_model], cache, by_mag, "cpu")
    graphed = graphed_patient_ops(fold_model, cache, by_mag, "cpu")
    assert 1 < graphed < counter.ops / 3
