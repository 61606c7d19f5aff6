"""The CUDA paths on a real GPU (run by tests/gpu_check.sh; skipped without CUDA): bf16 autocast,
the device-resident cache, no host sync in a step under torch's sync debug mode, a recorded step, the
out-of-memory back-off, a spawned worker. The CPU suite runs the same code on the CPU."""
import pandas as pd
import pytest
import torch

import utils.engine.fold as fold_module
import utils.engine.train as train_module
from config import experiment_config
from tests.conftest import in_spawned_worker, tiny_config, tiny_study

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: tests/gpu_check.sh runs these on one")]


def _cuda_config(tmp_path, **overrides):
    return tiny_config(tmp_path, device="cuda", amp="auto", workers=2, **overrides)


def test_bf16_or_fp16_autocast_trains_on_the_device_resident_cache(tmp_path, demo_tree, demo_index):
    cfg = _cuda_config(tmp_path, epochs=1)
    study = tiny_study(cfg, demo_tree, demo_index)
    assert study.env.amp_dtype in ("bfloat16", "float16") and study.source.on_device
    assert study.source.images.device.type == "cuda"
    fold_module.run_fold(cfg, study, "mmnet", 0)
    assert pd.read_csv(tmp_path / "runs/mmnet/fold0/predictions.csv")["prob"].between(0, 1).all()


@pytest.mark.parametrize("experiment, overrides", [("mmnet", {}), ("mmnet", {"ema_epochs": 1.0}),
                                                    ("mmnet", {"freeze_backbone": True}), ("mil_attention", {})])
def test_no_step_synchronises_with_the_host(experiment, overrides, tmp_path, demo_tree, demo_index, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call in a step."""
    from utils.engine.features import attach_features

    cfg = experiment_config(_cuda_config(tmp_path, epochs=1, **overrides), experiment)
    study = attach_features(cfg, tiny_study(cfg, demo_tree, demo_index))
    steps = []

    def strict(real):
        def wrapper(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                steps.append(1)
        return wrapper

    monkeypatch.setattr(train_module, "_step", strict(train_module._step))
    monkeypatch.setattr(train_module, "_predict_batch", strict(train_module._predict_batch))
    fold_module.run_fold(cfg, study, experiment, 0)
    assert len(steps) >= 4


def test_out_of_memory_halves_the_micro_batch_on_the_gpu(tmp_path, demo_tree, demo_index, monkeypatch):
    import preprocess.image_source as image_source_module
    from utils.device import out_of_memory_error

    real, calls = image_source_module.model_input, []

    def small_memory(images, *args, **kwargs):
        calls.append(images.shape[0])
        if images.shape[0] > 4:
            raise out_of_memory_error()("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(image_source_module, "model_input", small_memory)
    cfg = _cuda_config(tmp_path, epochs=1, micro_batch=8)
    result = fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    assert result["accumulation"] >= 2 and max(calls) > 4


def _worker_device(study):
    return study.env.device, study.source.images.device.type


def test_a_spawned_worker_trains_on_its_gpu(tmp_path, demo_tree, demo_index):
    assert in_spawned_worker(_cuda_config(tmp_path), demo_tree, demo_index, _worker_device) == ("cuda", "cuda")


def test_a_fold_with_cuda_graphs_predicts_what_the_eager_fold_predicts(tmp_path, demo_tree, demo_index):
    """--cuda-graphs on with the real recorder: the step captured after its warm-up and replayed
    (bf16, where the GPU has it); the predictions follow the eager fold's within the rounding of
    the float32 learning-rate tensor, as the CPU stand-in's do (tests/test_graphs.py)."""
    predictions = {}
    for mode in ("off", "on"):
        cfg = _cuda_config(tmp_path / mode, epochs=3, tuples_per_epoch=64, warmup_epochs=2.0, cuda_graphs=mode,
                           amp="bfloat16" if torch.cuda.is_bf16_supported() else "none", deterministic=True)
        study = tiny_study(cfg, demo_tree, demo_index)
        fold_module.run_fold(cfg, study, "mmnet", 0)
        predictions[mode] = pd.read_csv(tmp_path / mode / "runs/mmnet/fold0/predictions.csv")["prob"]
    assert (predictions["on"] - predictions["off"]).abs().max() < 0.02
