"""No host-device synchronisation inside a training or evaluation step: a step that waits on
the device (a scalar read, a value-sized op, a copy to the host, a tensor built from Python
values) stalls a GPU's queue every time. Counted with utils.device.HostSyncCounter on the CPU,
where the same code runs; tests/gpu_check.sh repeats it on CUDA with torch's sync debug mode."""
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import utils.engine.fold as fold_module
import utils.engine.train as train_module
from config import experiment_config
from preprocess.dataset import ImageSource
from tests.conftest import tiny_config, tiny_study
from utils.device import HostSyncCounter, counting_syncs, uncount_host_optimizer
from utils.engine.features import FeatureSource, attach_features

MODES = {"default": ("mmnet", {}), "ema": ("mmnet", {"ema_epochs": 1.0}),
         "frozen": ("mmnet", {"freeze_backbone": True}), "mil": ("mil_attention", {}),
         "no_stain_norm": ("mmnet", {"stain_norm": "none"}), "reinhard": ("mmnet", {"stain_norm": "reinhard"})}


def count_in_steps(monkeypatch, cfg, study, experiment: str) -> dict:
    """Runs one fold with every training step and evaluation batch under the counter."""
    seen = {"train": {}, "eval": {}, "steps": 0, "batches": 0}

    def counted(kind, real):
        def tally(counter):
            seen["steps" if kind == "train" else "batches"] += 1
            for name, n in counter.counts.items():
                seen[kind][name] = seen[kind].get(name, 0) + n
        return counting_syncs(real, tally)

    real_optimizer = train_module.make_optimizer

    def optimizer(*args):  # torch < 2.4 on the CPU: the multi-tensor AdamW, left out (see the function)
        made = real_optimizer(*args)
        uncount_host_optimizer(made)
        return made

    monkeypatch.setattr(train_module, "make_optimizer", optimizer)
    monkeypatch.setattr(train_module, "_step", counted("train", train_module._step))
    monkeypatch.setattr(train_module, "_predict_batch", counted("eval", train_module._predict_batch))
    fold_module.run_fold(cfg, study, experiment, 0)
    return seen


def resident_study(cfg, demo_tree, demo_index):
    """The study as a GPU holds it: images (and with a frozen encoder its maps) on the device,
    here the CPU standing in for it."""
    study = tiny_study(cfg, demo_tree, demo_index)
    images = ImageSource(study.source.images, "cpu", on_device=True, mags=study.index["mag"].to_numpy())
    study = attach_features(cfg, dataclasses.replace(study, source=images))
    if isinstance(study.source, FeatureSource):
        study = dataclasses.replace(study, source=FeatureSource(torch.from_numpy(np.asarray(study.source.maps)), images))
    assert study.source.on_device
    return study


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_in_a_training_or_evaluation_step(mode, tmp_path, demo_tree, demo_index, monkeypatch):
    experiment, overrides = MODES[mode]
    cfg = tiny_config(tmp_path, epochs=1, **overrides)
    seen = count_in_steps(monkeypatch, experiment_config(cfg, experiment), resident_study(cfg, demo_tree, demo_index),
                          experiment)
    assert seen["steps"] >= 4 and seen["batches"] >= 1  # the counter saw real steps
    assert seen["train"] == {} and seen["eval"] == {}, seen


def test_the_moving_average_matches_torchs_update_without_reading_the_device():
    """update_average against AveragedModel.update_parameters with torch's EMA function (the
    oracle): the same weights and buffers after five steps, and after a restore."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from utils.engine.train import moving_average, update_average

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    ours = moving_average(model, 1.0, 4)
    oracle = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ours.decay), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    for step in range(5):
        model(torch.randn(8, 3, 8, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        oracle.update_parameters(model)
        with HostSyncCounter() as counter:
            update_average(ours, model)
        assert counter.total == 0
        if step == 2:  # a resumed fold: a fresh average restored from the checkpoint's state
            from utils.engine.checkpoint import restore_average
            saved, ours = ours.state_dict(), moving_average(model, 1.0, 4)
            restore_average(ours, saved)
    for (name, mine), theirs in zip(ours.state_dict().items(), oracle.state_dict().values()):
        torch.testing.assert_close(mine.float(), theirs.float(), msg=name)


def test_the_parent_of_parallel_jobs_gives_its_device_copies_back_before_the_workers_start(tmp_path, demo_tree,
                                                                                           demo_index, monkeypatch):
    """With --jobs N the parent's cache copy (and the rate measurement's model) would hold GPU 0
    while a worker trains there: they are released, and the device's cache emptied, first."""
    import weakref

    import utils.study.runner as runner
    from preprocess.prepared import Study

    cfg = tiny_config(tmp_path, jobs=2, experiments=("single_40x",), epochs=1)
    sources, emptied, seen = [], [], {}
    real_attach = runner.attach_images

    def attach(*args):
        study = real_attach(*args)
        sources.append(weakref.ref(study.source))
        return study

    def fake_jobs(cfg, prepared, todo, jobs, log_file, tracker):
        seen["parent copy alive"] = sources[0]() is not None
        seen["emptied"] = list(emptied)
        return 0

    monkeypatch.setattr(runner, "attach_images", attach)
    monkeypatch.setattr(runner, "empty_cache", lambda device: emptied.append(device))
    monkeypatch.setattr(runner, "run_jobs", fake_jobs)
    monkeypatch.setattr(runner, "_predicted_seconds", lambda *args: {})
    prepared = Study(index=demo_index, folds=tiny_study(cfg, demo_tree, demo_index).folds, data_dir=demo_tree, demo=True)
    study, failed = runner.run_study(cfg, prepared, tiny_study(cfg, demo_tree, demo_index).env)
    assert seen == {"parent copy alive": False, "emptied": ["cpu"]} and failed == 0
    assert study.source is not None  # attached again afterwards, for the report's Grad-CAM


class EveryCall(TorchDispatchMode):
    """The oracle of the operator counts: a bare dispatch mode that counts each call."""
    calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        EveryCall.calls += 1
        return func(*args, **(kwargs or {}))


def steps_under_oracle(monkeypatch, skipped: int) -> list:
    """Every training step after the first `skipped` runs under EveryCall (step_counts wraps
    the patched step in its own counter); the returned list counts the steps."""
    real, steps = train_module._step, []

    def under_oracle(*args, **kwargs):
        steps.append(1)
        if len(steps) <= skipped:
            return real(*args, **kwargs)
        with EveryCall():
            return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", under_oracle)
    return steps


def test_the_benchmarks_operator_count_is_every_dispatched_operator_of_a_step(tmp_path, monkeypatch):
    """ops_per_step (utils.study.rates.step_counts, the benchmark's row) against a bare dispatch
    mode that counts each call, nested inside the same two steps after the first (whose optimizer
    state is built then); kernels leave out views and allocations; an MMNet step of four
    branches dispatches more operators than a single-image step."""
    from utils.device import detect_env
    from utils.study.benchmark import synthetic_study
    from utils.study.rates import step_counts

    steps = steps_under_oracle(monkeypatch, skipped=1)  # the warm-up step step_counts leaves out
    counts = {}
    for name in ("mmnet", "single_200x"):
        cfg = experiment_config(tiny_config(tmp_path), name)
        state, loop, _ = synthetic_study(cfg, detect_env(cfg), batches=1)
        EveryCall.calls, steps[:] = 0, []
        measured = step_counts(state, loop)
        counts[name] = measured["ops_per_step"]
        assert counts[name] == EveryCall.calls / 2, name
        assert 0 < measured["kernels_per_step"] < counts[name], name  # detach, view, t... run no kernel
    assert counts["mmnet"] > counts["single_200x"] > 0


def test_the_predictor_brings_a_patients_outputs_to_the_host_in_one_copy(monkeypatch):
    """on_host: every fold model's means (torch, and ONNX Runtime's numpy beside them) come back
    with their values and shapes, through one device-to-host copy for the whole patient."""
    from utils.engine.inference import on_host

    rng = torch.Generator().manual_seed(0)
    outputs = [{"prob": torch.rand((), generator=rng), "mag_weights": torch.rand(4, generator=rng),
                "subtype_prob": torch.rand(8, generator=rng)} for _ in range(5)]
    outputs.append({"prob": np.float32(0.25), "mag_weights": np.full(4, 0.25, np.float32)})  # an ONNX model's
    expected = [{k: np.asarray(v, dtype=np.float32) for k, v in out.items()} for out in outputs]
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(1) or real_cpu(self, *a, **k))
    host = on_host([dict(out) for out in outputs])
    assert len(copies) == 1
    for mine, theirs in zip(host, expected):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].shape == theirs[key].shape and np.allclose(mine[key], theirs[key]), key


def test_mmnet_side_by_side_launches_far_fewer_operators_than_branch_by_branch(tmp_path):
    """The benchmark's ops_per_step for MMNet with its encoders side by side against the same
    step with --grouped-branches off: the encoders, channel attention and pooling of four branches
    dispatch their operators once instead of four times (counted 1,112 against 2,006 here)."""
    from utils.device import detect_env
    from utils.study.benchmark import synthetic_study
    from utils.study.rates import step_counts

    counts = {}
    for grouped in ("on", "off"):
        cfg = experiment_config(tiny_config(tmp_path, grouped_branches=grouped), "mmnet")
        state, loop, _ = synthetic_study(cfg, detect_env(cfg), batches=1)
        assert (state.model.grouped_backbone is not None) == (grouped == "on")
        counts[grouped] = step_counts(state, loop)["ops_per_step"]
    assert counts["on"] < 0.6 * counts["off"], counts
