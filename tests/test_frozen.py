"""--freeze-backbone: cached encoder maps stand in for the encoder exactly, the encoder never
learns, and the cache is shared while its key holds and rebuilt when it changes."""
import dataclasses

import numpy as np
import pytest
import torch

import utils.engine.features as features
from backbones import build_model
from config import experiment_config
from preprocess.dataset import evaluation_samples, fold_split
from tests.conftest import tiny_config, tiny_study
from utils.engine.losses import StudyLoss
from utils.engine.train import EpochPlan, LoopSettings, new_fold_state, predict, train_one_epoch


def _frozen(tmp_path, demo_tree, demo_index, **overrides):
    cfg = tiny_config(tmp_path, freeze_backbone=True, **overrides)
    return cfg, features.attach_features(cfg, tiny_study(cfg, demo_tree, demo_index))


@pytest.mark.parametrize("experiment", ["mmnet", "mil_attention"])
def test_cached_maps_give_the_logits_of_the_encoder_on_the_fly(experiment, tmp_path, demo_tree, demo_index):
    """Tuples, and MIL bags (whose magnification codes come from the cached source as well)."""
    base, study = _frozen(tmp_path, demo_tree, demo_index)
    assert isinstance(study.source, features.FeatureSource)
    cfg = experiment_config(base, experiment)
    model = build_model(cfg).eval()
    tuples, _ = evaluation_samples(fold_split(study.index, study.usable, study.folds, 0, cfg)["test"], cfg)
    cached = predict(model, study.source, tuples, 8, "none", tta=True)["prob"]
    on_the_fly = predict(model, study.source.images, tuples, 8, "none", tta=True)["prob"]
    assert np.allclose(cached, on_the_fly, atol=2e-3)  # fp16 maps: rounding only
    assert cached.std() > 0  # not a constant output that would match anyway


def test_no_gradient_reaches_the_frozen_encoder(tmp_path, demo_tree, demo_index):
    cfg, study = _frozen(tmp_path, demo_tree, demo_index)
    state = new_fold_state(cfg, study.env, steps_per_epoch=2, seed=0)
    encoder = {n: p.detach().clone() for n, p in state.model.named_parameters() if "backbone" in n}
    trained = {n: p.detach().clone() for n, p in state.model.named_parameters() if "backbone" not in n}
    data = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    tuples = np.array([[r[0][0], r[1][0], r[2][0], r[3][0]] for r in data.rows])
    loop = LoopSettings(study.source, data, StudyLoss(cfg, None), 8, "none")
    train_one_epoch(state, loop, EpochPlan(tuples, np.arange(len(tuples)), torch.Generator().manual_seed(0), 0))
    after = dict(state.model.named_parameters())
    assert all(torch.equal(after[n], p) and after[n].grad is None for n, p in encoder.items())
    assert any(not torch.equal(after[n], p) for n, p in trained.items())  # the rest did learn


def test_cache_is_shared_and_rebuilt_when_its_key_changes(tmp_path, demo_tree, demo_index, monkeypatch):
    encoded, real = [], features.encode_to_file
    monkeypatch.setattr(features, "encode_to_file", lambda *a, **k: encoded.append(1) or real(*a, **k))
    cfg, study = _frozen(tmp_path, demo_tree, demo_index)
    features.attach_features(dataclasses.replace(cfg, model="single", magnifications=(40,)), study)
    assert len(encoded) == 1  # a second experiment reuses the maps
    _frozen(tmp_path, demo_tree, demo_index, backbone="test_vit")
    _frozen(tmp_path, demo_tree, demo_index, image_size=64)
    assert len(encoded) == 3 and len(list((tmp_path / "cache").glob("features_*.npy"))) == 3


def test_device_resident_maps_give_the_batches_of_host_maps():
    """The GPU path (maps as a tensor where the model runs; here the CPU) draws the same views
    and returns the same maps and masks as host or memory-mapped maps."""
    from preprocess.dataset import ImageSource

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((6, 4, 3, 2, 2)).astype(np.float16)
    images = ImageSource(np.zeros((6, 4, 4, 3), np.uint8), "cpu", mags=np.array([40, 100, 200, 400, 40, 100]))
    host, resident = features.FeatureSource(maps, images), features.FeatureSource(torch.from_numpy(maps), images)
    assert resident.on_device and not host.on_device
    tuples = np.array([[0, 1, -1, 3], [4, 5, 2, -1]])
    model = type("M", (), {"reads_levels": True})()
    a = host.train_batch(tuples, model, torch.Generator().manual_seed(1), (0.0, 0.0))
    b = resident.train_batch(tuples, model, torch.Generator().manual_seed(1), (0.0, 0.0))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[1].tolist() == [[1, 2, 0, 4], [1, 2, 3, 0]]  # magnification codes, 0 where empty
    assert (a[0][0, 2] == 0).all()
    views = [torch.equal(x[0], y[0]) for x, y in zip(host.views(tuples, model, True), resident.views(tuples, model, True))]
    assert views == [True] * 4


def test_two_folds_of_a_frozen_encoder_study_build_the_encoder_once(tmp_path, demo_tree, demo_index, monkeypatch):
    """The study holds its frozen encoder: the cache's encoding and both folds use one instance
    (without the hold, each fold model's death took the encoder with it: three builds)."""
    import backbones
    import utils.study.runner as runner
    from preprocess.prepared import Study

    built, real = [], backbones._create_backbone
    monkeypatch.setattr(backbones, "_create_backbone", lambda cfg: built.append(cfg.backbone) or real(cfg))
    monkeypatch.setattr(runner, "_predicted_seconds", lambda *args: {})
    cfg = tiny_config(tmp_path, freeze_backbone=True, epochs=1, tuples_per_epoch=8, experiments=("single_40x",))
    template = tiny_study(cfg, demo_tree, demo_index)
    prepared = Study(index=demo_index, folds=template.folds, data_dir=demo_tree, demo=True, magnifications=cfg.magnifications)
    _, failed = runner.run_study(cfg, prepared, template.env)
    assert failed == 0 and len(list((tmp_path / "runs" / "single_40x").glob("fold*/results.json"))) == 2
    assert built == ["test_resnet"]
    assert not backbones._HELD  # released when the study ends


def test_a_shared_feature_cache_is_encoded_once_and_a_failed_encoding_leaves_no_file(tmp_path, demo_tree, demo_index,
                                                                                     monkeypatch):
    """--executor ray: the cache sits beside the image cache (storage every node sees); two
    processes asking for it at once encode it once (a file lock); a failure leaves no partial file."""
    import threading
    import time

    cfg = dataclasses.replace(tiny_config(tmp_path, freeze_backbone=True), cache_dir="", executor="ray")
    assert features.feature_cache_dir(cfg) == tmp_path / "cache" / "features"
    study = tiny_study(cfg, demo_tree, demo_index)
    encoded, real = [], features.encode_to_file
    monkeypatch.setattr(features, "encode_to_file", lambda *a, **k: encoded.append(time.sleep(0.5)) or real(*a, **k))
    both = [threading.Thread(target=features.attach_features, args=(cfg, study)) for _ in range(2)]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    assert len(encoded) == 1 and len(list((tmp_path / "cache" / "features").glob("features_*.npy"))) == 1

    calls, real_map, written = [], features.feature_map, []

    def broken(*args):  # the first batch is written to the partial file, the second fails
        calls.append(1)
        if len(calls) > 1:
            written.extend(p.name for p in (tmp_path / "cache" / "features").glob("*.partial.npy"))
            raise RuntimeError("device lost")
        return real_map(*args)

    monkeypatch.setattr(features, "encode_to_file", real)
    monkeypatch.setattr(features, "feature_map", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        features.attach_features(dataclasses.replace(cfg, image_size=64), tiny_study(dataclasses.replace(cfg, image_size=64),
                                                                                        demo_tree, demo_index))
    assert len(written) == 1  # the failure came after a partial file was written
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 1  # the first cache only, the partial removed
