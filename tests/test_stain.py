"""--stain-norm: the batched normalisers agree with torchstain image by image, leave frames
without stain alone, and a fold's reference is fitted on its training images only."""
import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config, tiny_study

torchstain = pytest.importorskip("torchstain")
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer  # noqa: E402

from preprocess.stain import STD_FLOOR, Macenko, Reinhard, fit_montage, rgb_to_lab, symmetric_eigenvectors  # noqa: E402

HE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # haematoxylin, eosin optical densities


def stained_images(count: int, seed: int, h: int = 40, w: int = 60) -> np.ndarray:
    """(count, h, w, 3) uint8 H&E-like tiles: random H and E amounts per pixel, a different
    stain strength and tint per tile (as from different labs), some white background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        he = HE * rng.uniform(0.7, 1.3, size=(1, 2)) + rng.uniform(0, 0.08, size=(3, 2))
        amounts = rng.gamma(2.0, 0.4, size=(h * w, 2)) * (rng.random((h * w, 1)) > 0.15)
        out.append((240 * np.exp(-amounts @ he.T)).clip(0, 255).astype(np.uint8).reshape(h, w, 3))
    return np.stack(out)


def real_or_synthetic(genuine: bool):
    if not genuine:
        return stained_images(10, seed=3)
    from PIL import Image

    from tests.conftest import GENUINE
    files = sorted(GENUINE.rglob("*.png"))[:10]
    if not files:
        pytest.skip("../shared/breakhis/genuine not available")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((90, 60))) for f in files])


def as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().reshape(len(images), -1, 3) / 255


# Ours, torchstain's, and one image normalised by torchstain as (H, W, 3) floats.
ORACLES = {"macenko": (Macenko, TorchMacenkoNormalizer, lambda o, image: o.normalize(image, stains=False)[0]),
           "reinhard": (Reinhard, TorchReinhardNormalizer, lambda o, image: o.normalize(image))}


@pytest.mark.parametrize("name", ORACLES)
@pytest.mark.parametrize("genuine", [False, True], ids=["synthetic", "genuine BreakHis"])
def test_batched_normaliser_matches_torchstain_per_image(name, genuine):
    images = real_or_synthetic(genuine)
    kind, oracle_kind, normalise = ORACLES[name]
    ours, oracle = kind(), oracle_kind()
    ours.fit(fit_montage(images[:4]))
    oracle.fit(fit_montage(images[:4]).permute(2, 0, 1))
    batched = ours(as_pixels(images[4:])) * 255
    for i, image in enumerate(images[4:]):
        expected = normalise(oracle, torch.from_numpy(image).permute(2, 0, 1)).float()
        # torchstain truncates to integers: at most one grey level apart
        assert (batched[i].reshape(expected.shape) - expected).abs().max() < 1.01
    assert (batched - as_pixels(images[4:]) * 255).abs().mean() > 1  # it did change the colours


def test_jacobi_eigenvectors_match_eigh():
    """The sync-free eigenvectors against torch.linalg.eigh (up to sign), and a zero matrix."""
    torch.manual_seed(0)
    samples = torch.randn(500, 40, 3) * torch.tensor([3.0, 1.0, 0.2])
    covariance = torch.cat([samples.transpose(1, 2) @ samples / 40, torch.zeros(1, 3, 3)])
    ours = symmetric_eigenvectors(covariance)
    values, theirs = torch.linalg.eigh(covariance[:-1])
    assert torch.allclose(ours[:-1].abs(), theirs.abs(), atol=1e-4)
    rebuilt = ours[:-1] @ torch.diag_embed(values) @ ours[:-1].transpose(1, 2)
    assert torch.allclose(rebuilt, covariance[:-1], atol=1e-4)
    assert torch.isfinite(ours[-1]).all()


@pytest.mark.parametrize("kind", [Macenko, Reinhard])
def test_an_unfitted_normaliser_changes_nothing(kind):
    """A model built outside a fold (a benchmark, a test) has no reference yet: identity."""
    pixels = as_pixels(stained_images(2, seed=4))
    assert torch.equal(kind()(pixels), pixels)


@pytest.mark.parametrize("kind", [Macenko, Reinhard])
def test_frames_without_stain_pass_unchanged(kind):
    """Empty slots (black), blank glass (white) and flat grey frames: nothing to estimate, no NaN."""
    normaliser = kind()
    normaliser.fit(fit_montage(stained_images(4, seed=0)))
    frames = torch.stack([torch.zeros(600, 3), torch.ones(600, 3), torch.full((600, 3), 0.5),
                          as_pixels(stained_images(1, seed=9, h=20, w=30))[0]])
    out = normaliser(frames)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3], frames[:3])
    assert not torch.allclose(out[3], frames[3])


def test_normalised_images_share_the_reference_colour():
    """Tiles of different stain strength come out closer in mean colour than they went in."""
    images = stained_images(8, seed=5)
    for normaliser in (Macenko(), Reinhard()):
        normaliser.fit(fit_montage(images[:4]))
        before, after = as_pixels(images[4:]), normaliser(as_pixels(images[4:]))
        assert after.mean(1).std(0).sum() < 0.5 * before.mean(1).std(0).sum()


@pytest.fixture(scope="module")
def fold_setup(tmp_path_factory, demo_tree, demo_index):
    from preprocess.dataset import fold_split
    from preprocess.image_source import ImageSource

    cfg = tiny_config(tmp_path_factory.mktemp("stain"), stain_norm="macenko")
    study = tiny_study(cfg, demo_tree, demo_index)
    split = fold_split(study.index, study.usable, study.folds, 0, cfg)
    writable = ImageSource(np.array(study.source.images), "cpu", on_device=False)
    return cfg, study, split, writable


def _rows(data) -> np.ndarray:
    return np.concatenate([r for per_mag in data.rows for r in per_mag])


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_the_study_reference_of_a_fold_ignores_its_test_images(fold_setup, tmp_path, name):
    """The production path (utils.engine.stain_reference): inverting every test-fold image leaves
    the fold's reference bit-identical; darkening the training images changes it."""
    from utils.engine.stain_reference import shared_reference

    cfg, study, split, source = fold_setup
    study = dataclasses.replace(study, source=source)
    fresh = iter(range(3))
    reference = lambda: shared_reference(dataclasses.replace(cfg, stain_norm=name, output_dir=str(tmp_path / str(
        next(fresh)))), study, 0)  # a new output folder each time: fitted again, never read back
    before = reference()
    original = source.images.copy()
    try:
        test_rows = _rows(split["test"])
        source.images[test_rows] = 255 - source.images[test_rows]  # the test fold's colours inverted
        assert all(torch.equal(before[k], v) for k, v in reference().items())
        train_rows = _rows(split["train"])
        source.images[train_rows] = source.images[train_rows] // 2  # the training images darker
        assert any(not torch.allclose(before[k], v) for k, v in reference().items())
    finally:
        source.images[:] = original


def test_every_experiment_of_a_fold_is_normalised_to_one_reference(fold_setup, tmp_path):
    """MMNet (four magnifications) and single_40x (one) on the same fold: one reference file,
    fitted once, and both kept fold models hold it, bit for bit."""
    from config import experiment_config
    from utils.engine.fold import run_fold
    from utils.engine.inference import load_fold_model
    from utils.engine.stain_reference import STAIN_DIR

    cfg, study, _, _ = fold_setup
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path), epochs=1)
    for name in ("mmnet", "single_40x"):
        run_fold(experiment_config(cfg, name), study, name, 0)
    assert len(list((tmp_path / STAIN_DIR).glob("fold0-*.pt"))) == 1
    held = [load_fold_model(tmp_path / "models" / name / "fold0.pt").model.stain.state_dict()
            for name in ("mmnet", "single_40x")]
    assert held[0]["fitted"] and all(torch.equal(held[0][k], held[1][k]) for k in held[0])


def test_reinhard_leaves_a_grey_ramp_grey():
    """A grey ramp has a*/b* spread of rounding noise only: the frame passes unchanged instead of
    that noise being scaled up into colour; a tissue frame is still normalised."""
    normaliser = Reinhard()
    normaliser.fit(fit_montage(stained_images(4, seed=0)))
    ramp = torch.linspace(0.1, 0.9, 600)[:, None].expand(600, 3).contiguous()
    tissue = as_pixels(stained_images(1, seed=9, h=20, w=30))[0]
    out = normaliser(torch.stack([ramp, tissue]))
    assert (out[0].max(-1).values - out[0].min(-1).values).max() * 255 < 1  # every pixel still grey
    assert not torch.allclose(out[1], tissue)
    # A faintly tinted ramp is coloured, but its noise is amplified at most 1 / STD_FLOOR times.
    tinted = ramp * torch.tensor([1.0, 0.99, 1.0])
    lab_in = rgb_to_lab(tinted)[:, 1:].std(0)
    lab_out = rgb_to_lab(normaliser(tinted[None])[0])[:, 1:].std(0)
    assert (lab_out <= lab_in / STD_FLOOR + 1e-3).all()


def test_fold_model_carries_and_applies_its_reference(fold_setup, tmp_path):
    """The kept fold model holds the fitted reference; the predictor's model input uses it."""
    from preprocess.augment import model_input
    from utils.engine.fold import run_fold
    from utils.engine.inference import load_fold_model

    cfg, study, _, _ = fold_setup
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path), epochs=1, folds=2)
    run_fold(cfg, study, "mmnet", 0)
    fold_model = load_fold_model(tmp_path / "models" / "mmnet" / "fold0.pt")
    model = fold_model.model
    assert isinstance(model.stain, Macenko) and model.stain.stain_matrix.abs().sum() > 0
    images = torch.from_numpy(stained_images(4, seed=11))[None]  # (1, M=4, H, W, 3), one tuple
    plain = torch.nn.Module()
    plain.pixel_mean, plain.pixel_std = model.pixel_mean, model.pixel_std
    assert not torch.allclose(model_input(images, model), model_input(images, plain))


def test_stain_norm_options_are_checked():
    from config import Config, ConfigError, validate

    assert Config(stain_norm="none").training_hash() != Config().training_hash()
    assert Config(stain_norm=Config().stain_method()).training_hash() == Config().training_hash()
    assert Config(freeze_backbone=True).stain_method() == "none"  # auto: one cache serves every fold
    with pytest.raises(ConfigError, match="CFG010"):
        validate(Config(stain_norm="reinhard", freeze_backbone=True))
    with pytest.raises(ConfigError, match="CFG004"):
        validate(Config(stain_norm="vahadane"))


def test_runs_from_before_the_option_read_as_unnormalised(tmp_path):
    """An older run's config.yaml and fold model lack stain_norm: they had none, not the default."""
    import dataclasses

    import yaml

    from config import Config, read_config_file

    older = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(Config()).items()
             if k != "stain_norm"}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(older))
    assert read_config_file(tmp_path / "old.yaml")["stain_norm"] == "none"
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"epochs": 3}))
    assert "stain_norm" not in read_config_file(tmp_path / "short.yaml")  # the default applies


@pytest.mark.parametrize("on_device", [False, True], ids=["host cache", "device-resident cache"])
def test_a_fold_normalises_its_images_once_and_training_does_not_again(fold_setup, on_device):
    """The fold's training copy holds every image normalised once (to within the uint8 rounding
    of the per-batch path), and a training batch from it runs no normaliser; the raw source's
    batches still do (validation, test and the predictor read raw images)."""
    from preprocess.augment import prepare_batch
    from preprocess.image_source import ImageSource
    from utils.engine.fold import normalised_once

    cfg = fold_setup[0]
    source = ImageSource(stained_images(24, seed=5), "cpu", on_device=on_device)  # demo frames hold too little stain
    normaliser = Macenko()
    normaliser.fit(fit_montage(stained_images(8, seed=3)))  # another draw of stains: the images move
    once = normalised_once(cfg, source, normaliser.state_dict())
    assert once.stain_applied and not source.stain_applied
    rows = np.arange(24)[:, None]
    raw, _ = source.gather(rows)
    done, _ = once.gather(rows)
    per_batch = prepare_batch(raw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, stain=normaliser)
    stored = prepare_batch(done, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None)
    assert (per_batch - stored).abs().max() <= 0.5 / 255 + 1e-6  # rounded once to the nearest grey level
    assert (stored - prepare_batch(raw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None)).abs().max() > 0.05  # it did normalise

    model = torch.nn.Module()
    model.pixel_mean, model.pixel_std, model.stain = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), normaliser
    calls = []
    normaliser.register_forward_hook(lambda *args: calls.append(1))
    once.train_batch(rows[:8], model, torch.Generator().manual_seed(0), (0.1, 0.1))
    next(iter(once.views(rows[:8], model, False)))
    assert calls == []
    source.train_batch(rows[:8], model, torch.Generator().manual_seed(0), (0.1, 0.1))
    assert calls == [1]
