"""The GPU and MPS code paths, run on the CPU: device-resident images, bf16 autocast, fp16
with a loss scaler, MPS-safe grid pooling, spawned workers, resume on another micro-batch,
out-of-memory back-off and checkpoints on a timer (the pod's torch and the start-up checks:
tests/test_pod_setup.py)."""
import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import preprocess.image_source as image_source_module
import utils.engine.fold as fold_module
from backbones import build_model
from backbones.our.modules import cell_means
from config import Config, experiment_config
from preprocess.dataset import ImageSource
from tests.conftest import in_spawned_worker, tiny_config, tiny_study
from utils.device import out_of_memory_error
from utils.engine.saving import BackgroundWriter


def _run(cfg, demo_tree, demo_index, fold=0, experiment="mmnet"):
    study = tiny_study(cfg, demo_tree, demo_index)
    return fold_module.run_fold(experiment_config(cfg, experiment), study, experiment, fold)


def _adaptive_cells(x: torch.Tensor, grids: tuple) -> torch.Tensor:
    """The oracle: adaptive_avg_pool2d's cells of every grid, (B, n, C), grid after grid, row-major."""
    return torch.cat([F.adaptive_avg_pool2d(x, g).flatten(2) for g in grids], dim=2).transpose(1, 2)


@pytest.mark.parametrize("height, width", [(8, 8), (12, 12), (7, 11), (7, 7), (5, 9), (2, 2)])
def test_every_grids_cells_in_one_product_equal_adaptive_pooling(height, width):
    """resnet18 at 224x341 gives 7x11 maps: the cells of the 1, 2 and 4 grids from one matrix
    product equal the CPU's adaptive pooling (which takes any size, MPS does not), values and
    gradients, for channels-last maps as the encoders give them."""
    x = torch.randn(2, 6, height, width, requires_grad=True)
    mine = cell_means(x.to(memory_format=torch.channels_last), (1, 2, 4))
    theirs = _adaptive_cells(x, (1, 2, 4))
    torch.testing.assert_close(mine, theirs)
    weights = torch.randn_like(theirs)
    grad_mine = torch.autograd.grad((mine * weights).sum(), x)[0]
    grad_theirs = torch.autograd.grad((theirs * weights).sum(), x)[0]
    torch.testing.assert_close(grad_mine, grad_theirs)


def test_mmnet_at_224_px_runs_where_adaptive_pooling_needs_divisible_sizes(monkeypatch):
    """resnet18 at 224 px gives 7x7 maps; MPS refuses adaptive pooling of 7x7 to 2x2 or 4x4."""
    real = F.adaptive_avg_pool2d

    def mps_like(x, size):
        grid = size if isinstance(size, int) else size[0]
        if x.shape[-1] % grid or x.shape[-2] % grid:
            raise RuntimeError("Adaptive pool MPS: input sizes must be divisible by output sizes.")
        return real(x, size)

    monkeypatch.setattr(F, "adaptive_avg_pool2d", mps_like)
    with pytest.raises(RuntimeError, match="divisible"):
        F.adaptive_avg_pool2d(torch.zeros(1, 1, 7, 7), 2)
    model = build_model(Config(backbone="resnet18", pretrained="off", image_size=224, feature_dim=32))
    out = model(torch.randn(1, 4, 3, 224, 224), torch.ones(1, 4))
    out.logits.sum().backward()
    assert out.attention_maps.shape[-2:] == (7, 7) and torch.isfinite(out.logits).all()
    assert all(p.grad is not None for p in model.branches[0].pool.parameters())


def test_device_resident_source_matches_the_memmap_and_does_not_warn(tmp_path):
    cache = np.random.default_rng(0).integers(0, 256, (6, 8, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "c.npy", cache)
    memmap = np.load(tmp_path / "c.npy", mmap_mode="r")  # read-only, as the run maps it
    tuples = np.array([[0, -1], [3, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" UserWarning would fail here
        resident = ImageSource(memmap, "cpu", on_device=True)
        a, mask_a = resident.gather(tuples)
    b, mask_b = ImageSource(memmap, "cpu").gather(tuples)
    assert isinstance(resident.images, torch.Tensor) and torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert a[0, 1].sum() == 0 and mask_a.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixed_precision_paths_train(amp, tmp_path, demo_tree, demo_index):
    """bf16 autocast (Ampere and newer) and fp16 autocast with a GradScaler (older GPUs)."""
    try:
        with torch.autocast("cpu", dtype=getattr(torch, amp)):
            pass
    except RuntimeError:  # torch < 2.2: CPU autocast knows bf16 only; fp16 is a CUDA path (tests/test_gpu.py)
        pytest.skip(f"this torch's CPU autocast has no {amp}")
    cfg = tiny_config(tmp_path, epochs=1, amp=amp)
    study = tiny_study(cfg, demo_tree, demo_index)
    state = fold_module.new_fold_state(cfg, study.env, steps_per_epoch=4, seed=0)
    # torch < 2.3 has only torch.cuda's scaler, which cannot run without CUDA: there the CPU
    # emulation of the fp16 path trains with the scaler off (utils.device.grad_scaler).
    scales = amp == "float16" and (hasattr(torch.amp, "GradScaler") or torch.cuda.is_available())
    assert study.env.amp_dtype == amp and state.scaler.is_enabled() == scales
    result = fold_module.run_fold(cfg, study, "mmnet", 0)
    predictions = pd.read_csv(tmp_path / "runs/mmnet/fold0/predictions.csv")
    assert result["epochs_run"] == 1 and predictions["prob"].between(0, 1).all()


def test_device_resident_source_trains_like_the_memmap(tmp_path, demo_tree, demo_index):
    results = {}
    for resident in (False, True):
        cfg = tiny_config(tmp_path / str(resident), epochs=1)
        study = tiny_study(cfg, demo_tree, demo_index)
        if resident:
            study = dataclasses.replace(study, source=ImageSource(study.source.images, "cpu", on_device=True))
        fold_module.run_fold(cfg, study, "mmnet", 0)
        results[resident] = pd.read_csv(tmp_path / str(resident) / "runs/mmnet/fold0/predictions.csv")
    pd.testing.assert_frame_equal(results[False], results[True], check_exact=True)


def test_resume_with_another_micro_batch(tmp_path, demo_tree, demo_index, monkeypatch):
    whole = tiny_config(tmp_path / "whole", epochs=2)
    _run(whole, demo_tree, demo_index)
    cut = tiny_config(tmp_path / "cut", epochs=2)
    real = fold_module.train_one_epoch

    def interrupted(state, loop, plan):
        if plan.epoch == 1:
            raise KeyboardInterrupt
        return real(state, loop, plan)

    monkeypatch.setattr(fold_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(cut, demo_tree, demo_index)
    monkeypatch.setattr(fold_module, "train_one_epoch", real)
    result = _run(dataclasses.replace(cut, micro_batch=4), demo_tree, demo_index)  # a smaller GPU
    assert result["accumulation"] == 2 and result["epochs_run"] == 2
    # Epoch 1 came from the checkpoint unchanged; epoch 2 ran as 2 x 4 tuples per step. Its
    # numbers differ from 1 x 8 (batch norm sees 4 tuples at a time), so only epoch 1 is equal.
    a = pd.read_csv(tmp_path / "whole/runs/mmnet/fold0/history.csv")
    b = pd.read_csv(tmp_path / "cut/runs/mmnet/fold0/history.csv")
    assert len(b) == 2 and a.loc[0, "train_loss"] == b.loc[0, "train_loss"]
    assert a.loc[0, "train_binary_loss"] == b.loc[0, "train_binary_loss"]


def test_mps_out_of_memory_halves_the_micro_batch(tmp_path, demo_tree, demo_index, monkeypatch, caplog):
    real = image_source_module.model_input

    def small_memory(images, *args, **kwargs):
        if images.shape[0] > 4:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 17.1 GB, other allocations: 1 GB)")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(image_source_module, "model_input", small_memory)
    result = _run(tiny_config(tmp_path, epochs=1), demo_tree, demo_index)
    assert result["accumulation"] == 2 and "micro-batches of 4 (x2 accumulation)" in caplog.text


def test_a_runtime_error_that_is_not_memory_is_not_swallowed(tmp_path, demo_tree, demo_index, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(image_source_module, "model_input", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _run(tiny_config(tmp_path, epochs=1), demo_tree, demo_index)


@pytest.mark.parametrize("minutes, expected", [(0.0, 2), (60.0, 0)])
def test_last_checkpoint_on_a_timer_never_at_the_end(minutes, expected, tmp_path, demo_tree, demo_index, monkeypatch):
    """A spy writer sees every file a fold submits: last.pt only while epochs remain (every
    epoch with --checkpoint-minutes 0), and at the end only the kept fold model, once."""
    written, real_submit = [], BackgroundWriter.submit

    def recording(self, items):
        written.extend(str(path.relative_to(tmp_path)) for _, path in items)
        return real_submit(self, items)

    monkeypatch.setattr(BackgroundWriter, "submit", recording)
    _run(tiny_config(tmp_path, epochs=3, checkpoint_minutes=minutes), demo_tree, demo_index)
    assert written.count("runs/mmnet/fold0/last.pt") == expected
    assert written[-1] == "models/mmnet/fold0.pt" and written.count("models/mmnet/fold0.pt") == 1
    assert "runs/mmnet/fold0/best.pt" not in written  # the fixed budget needs no best.pt to resume
    assert (tmp_path / "models/mmnet/fold0.pt").is_file()  # kept where users look for it
    assert not list((tmp_path / "runs/mmnet/fold0").glob("*.pt"))


def test_a_fold_whose_model_is_not_kept_writes_no_model(tmp_path, demo_tree, demo_index, monkeypatch):
    written, real_submit = [], BackgroundWriter.submit

    def recording(self, items):
        written.extend(path.name for _, path in items)
        return real_submit(self, items)

    monkeypatch.setattr(BackgroundWriter, "submit", recording)
    cfg = tiny_config(tmp_path, epochs=2, checkpoint_minutes=60.0, keep_models="mmnet")
    result = _run(cfg, demo_tree, demo_index, experiment="single_200x")
    assert written == [] and result["batchnorm_settled"]
    assert (tmp_path / "runs/single_200x/fold0/predictions.csv").is_file()


def _backend_flags(study):
    return torch.are_deterministic_algorithms_enabled(), study.env.micro_batch


def test_spawned_workers_configure_their_backends(tmp_path, demo_tree, demo_index):
    cfg = tiny_config(tmp_path, deterministic=True, micro_batch=4)
    deterministic, micro = in_spawned_worker(cfg, demo_tree, demo_index, _backend_flags, timeout=120)
    assert deterministic is True and micro == 4


def test_out_of_memory_while_measuring_the_speed_does_not_stop_the_study(tmp_path, demo_tree, demo_index, monkeypatch, caplog):
    import utils.study.runner as study_module
    from preprocess.prepared import Study

    def no_memory(*args, **kwargs):
        raise out_of_memory_error()("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(study_module, "predict_duration", no_memory)
    cfg = tiny_config(tmp_path, epochs=1, experiments=("mmnet",))
    prepared = tiny_study(cfg, demo_tree, demo_index)
    prepared = Study(prepared.index, prepared.folds, prepared.data_dir, prepared.demo)
    _, failed = study_module.run_study(cfg, prepared, prepared_env(cfg))
    assert failed == 0 and "could not measure the speed" in caplog.text
    assert (tmp_path / "runs/mmnet/fold1/results.json").is_file()


def prepared_env(cfg):
    from utils.device import detect_env

    return detect_env(cfg)
