"""Foundation encoders at their real size, with a randomly initialised ViT standing in: one frozen
instance for every branch, copy and fold model; fold models without it; the cache placed by
the memory that is really there."""
import dataclasses

import numpy as np
import pytest
import torch

import utils.engine.features as features
from backbones import build_model
from backbones.encoder import fingerprint, frozen_encoder, frozen_prefixes
from config import experiment_config
from preprocess.dataset import evaluation_samples, fold_split
from tests.conftest import tiny_config, tiny_study
from utils.engine.checkpoint import saved_state
from utils.engine.train import moving_average, predict
from utils.env import available_memory, container_memory_left

STAND_IN = "vit_small_patch16_224"  # 22 M parameters, random init: no download


def _encoder_bytes(encoder: torch.nn.Module) -> int:
    return sum(t.numel() * 4 for t in encoder.state_dict().values())


def test_one_frozen_encoder_serves_every_branch_copy_and_model(tmp_path):
    cfg = tiny_config(tmp_path, backbone=STAND_IN, freeze_backbone=True)
    model = build_model(cfg)
    encoder = frozen_encoder(model)
    assert all(branch.backbone is encoder for branch in model.branches)
    assert frozen_encoder(build_model(cfg)) is encoder  # the next fold model: loaded once per process
    average = moving_average(model, ema_epochs=1.0, steps_per_epoch=4)
    assert frozen_encoder(average.module) is encoder  # the moving average does not copy it
    assert not any(p.requires_grad for p in encoder.parameters())
    saved = saved_state(model)
    assert not any(k.startswith(tuple(frozen_prefixes(model))) for k in saved)
    trainable = sum(v.numel() * v.element_size() for v in saved.values())
    assert 0 < trainable < 0.5 * _encoder_bytes(encoder)


def test_a_fine_tuned_model_saves_every_weight(tmp_path):
    model = build_model(tiny_config(tmp_path, backbone=STAND_IN))
    assert frozen_encoder(model) is None and saved_state(model).keys() == model.state_dict().keys()


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, demo_tree, demo_index):
    from utils.engine.fold import run_fold

    out = tmp_path_factory.mktemp("frozen_vit")
    cfg = tiny_config(out, backbone=STAND_IN, freeze_backbone=True, epochs=1)
    study = features.attach_features(cfg, tiny_study(cfg, demo_tree, demo_index))
    run_fold(experiment_config(cfg, "mmnet"), study, "mmnet", 0)
    return cfg, study, out / "models" / "mmnet" / "fold0.pt"


def test_kept_model_is_small_and_rebuilds_its_encoder(frozen_run):
    from utils.engine.inference import load_fold_model

    cfg, study, path = frozen_run
    encoder = frozen_encoder(build_model(cfg))
    assert path.stat().st_size < 0.5 * _encoder_bytes(encoder)
    fold_model = load_fold_model(path)
    assert frozen_encoder(fold_model.model) is encoder  # rebuilt once, the fingerprint checked
    payload = torch.load(path, weights_only=True)
    assert payload["encoder"] == {"backbone": STAND_IN, "fingerprint": fingerprint(encoder)}


def test_other_encoder_weights_are_refused(frozen_run, tmp_path):
    from utils.engine.inference import load_fold_model

    _, _, path = frozen_run
    payload = torch.load(path, weights_only=True)
    payload["encoder"]["fingerprint"] = "0" * 32
    torch.save(payload, tmp_path / "fold0.pt")
    with pytest.raises(ValueError, match="pass the same --pretrained-file"):
        load_fold_model(tmp_path / "fold0.pt")


def test_kept_model_predicts_from_pixels_as_from_cached_maps(tmp_path, demo_tree, demo_index):
    """A BatchNorm encoder keeps its statistics when the fold's own layers are settled: the
    kept model on pixels (the predictor, Grad-CAM) gives the fold's predictions from maps."""
    from utils.engine.fold import run_fold
    from utils.engine.inference import load_fold_model

    cfg = tiny_config(tmp_path, freeze_backbone=True, epochs=1, seed=7)  # test_resnet: BatchNorm layers; its
    # own seed, so the encoder perturbed below is this test's alone
    encoder = frozen_encoder(build_model(cfg))  # held: the instance every step below uses
    for layer in encoder.modules():  # statistics of a pretrained encoder, not the reset values
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    study = features.attach_features(cfg, tiny_study(cfg, demo_tree, demo_index))
    run_fold(cfg, study, "mmnet", 0)
    model = load_fold_model(tmp_path / "models" / "mmnet" / "fold0.pt").model
    tuples, _ = evaluation_samples(fold_split(study.index, study.usable, study.folds, 0, cfg)["test"], cfg)
    from_maps = predict(model, study.source, tuples, 8, "none", tta=True)["prob"]
    from_pixels = predict(model, study.source.images, tuples, 8, "none", tta=True)["prob"]
    assert np.allclose(from_maps, from_pixels, atol=2e-3) and from_maps.std() > 0


@pytest.mark.parametrize("size_gb, gpu_free_gb, host_free_gb, sharing, expected", [
    (38.9, 80, 500, 1, "gpu"),     # ViT-g maps on an 80 GB card with the encoder released
    (38.9, 70, 500, 1, "host"),    # ... not while a 10 GB encoder still sits there
    (10, 80, 500, 4, "gpu"),       # four jobs on one GPU: a quarter each
    (15, 80, 500, 4, "host"),
    (38.9, None, 64, 1, "disk"),   # no GPU, a 64 GB container: read from disk
    (20, None, 64, 1, "host"),
])
def test_placement_of_the_cache(size_gb, gpu_free_gb, host_free_gb, sharing, expected):
    gb = 10 ** 9
    gpu = None if gpu_free_gb is None else gpu_free_gb * gb
    assert features.placement(int(size_gb * gb), gpu, host_free_gb * gb, sharing) == expected


def test_container_limit_is_read_before_host_memory(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")  # 8 GiB
    (v2 / "memory.current").write_text("2147483648\n")  # 2 GiB used
    assert container_memory_left(v2) == 6 * 2 ** 30
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("4294967296\n")
    (v1 / "memory.usage_in_bytes").write_text("1073741824\n")
    assert container_memory_left(tmp_path / "v1") == 3 * 2 ** 30
    (v2 / "memory.max").write_text("max\n")
    assert container_memory_left(v2) is None  # no limit: the host's figure
    monkeypatch.setattr("utils.env.host_memory_free", lambda: 100 * 2 ** 30)
    assert available_memory(tmp_path / "v1") == 3 * 2 ** 30
    assert available_memory(v2) == 100 * 2 ** 30


def test_cache_is_written_through_a_map_on_local_disk(tmp_path, demo_tree, demo_index, monkeypatch):
    """Default place: the local temporary folder, not the output folder; --feature-grid pools
    the maps (and the model's own encoder path the same way); a full disk stops with one line."""
    monkeypatch.setattr(features.tempfile, "gettempdir", lambda: str(tmp_path / "local"))
    cfg = dataclasses.replace(tiny_config(tmp_path / "out", freeze_backbone=True), cache_dir="")
    assert features.feature_cache_dir(cfg) == tmp_path / "local" / "mmnet-features"
    study = features.attach_features(cfg, tiny_study(cfg, demo_tree, demo_index))
    full = study.source.maps
    assert isinstance(full, np.memmap) and not list((tmp_path / "out").rglob("features_*.npy"))
    pooled = features.attach_features(dataclasses.replace(cfg, feature_grid=1), study).source.maps
    assert pooled.shape[-2:] == (1, 1) and full.shape[-1] > 1
    assert np.allclose(pooled[:4, 0, :, 0, 0], full[:4, 0].astype(np.float32).mean((-1, -2)), atol=1e-2)
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(features.ConfigError, match="--feature-grid"):
        features.attach_features(dataclasses.replace(cfg, feature_grid=2), study)
