"""Fusion strategies and MIL aggregators: every registered one against the properties the
study relies on (masking, order, weights, gradients), and MIL attention finding the one
informative image of a bag."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from backbones import build_model
from backbones.fusion import create_fusion, list_fusions
from backbones.mil import create_aggregator, list_aggregators
from config import FUSIONS, MIL_AGGREGATORS, Config, ConfigError, experiment_config

DIM, COUNT = 16, 4
MASK = torch.tensor([[1.0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 1]])  # missing 40X; only 40X and 400X


def _gradients_reach_every_parameter(module, loss):
    module.zero_grad()
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_registries_hold_exactly_the_configured_names():
    assert list_fusions() == sorted(FUSIONS)
    assert list_aggregators() == sorted(MIL_AGGREGATORS)
    with pytest.raises(ConfigError, match=r"\[CFG004\] fusion: unknown fusion strategy 'sum'.*valid: attention, bilinear"):
        create_fusion("sum", DIM, COUNT)


@pytest.mark.parametrize("name", FUSIONS)
def test_fusion_strategy(name):
    torch.manual_seed(0)
    fusion = create_fusion(name, DIM, COUNT)
    z = torch.randn(3, COUNT, DIM)
    fused, weights = fusion(z, MASK)
    assert fused.shape == (3, DIM) and torch.isfinite(fused).all()
    if weights is not None:  # a weighted sum: shares of the present magnifications
        assert weights.shape == (3, COUNT)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
        assert (weights[MASK == 0] == 0).all()
    other = z.clone()
    other[MASK == 0] = 1e4  # whatever sits in a missing slot changes nothing
    torch.testing.assert_close(fusion(other, MASK)[0], fused)
    if any(True for _ in fusion.parameters()):
        _gradients_reach_every_parameter(fusion, (fusion(torch.randn(3, COUNT, DIM), torch.ones(3, COUNT))[0] * torch.randn(DIM)).sum())


@pytest.mark.parametrize("name", MIL_AGGREGATORS)
def test_mil_aggregator(name):
    torch.manual_seed(0)
    aggregator = create_aggregator(name, DIM)
    h = torch.randn(2, 6, DIM)
    present = torch.tensor([[1.0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]])
    pooled, weights = aggregator(h, present)
    assert pooled.shape == (2, DIM) and torch.isfinite(pooled).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))  # over the present images
    assert (weights[present == 0] == 0).all()
    order = torch.tensor([5, 3, 0, 4, 1, 2])  # the same bag, images in another order
    pooled_perm, weights_perm = aggregator(h[:, order], present[:, order])
    torch.testing.assert_close(pooled_perm, pooled)
    torch.testing.assert_close(weights_perm, weights[:, order])
    other = h.clone()
    other[present == 0] = 1e4
    torch.testing.assert_close(aggregator(other, present)[0], pooled)
    if any(True for _ in aggregator.parameters()):
        _gradients_reach_every_parameter(aggregator, (aggregator(h, present)[0] * torch.randn(DIM)).sum())


def _informative_bags(n: int, size: int, channels: int, generator: torch.Generator):
    """Bags of `size` noise maps (n, size, C, 2, 2); in malignant bags exactly one image (at a
    random position) carries the signal, a shift along one channel direction."""
    maps = torch.randn(n, size, channels, 2, 2, generator=generator)
    labels = torch.arange(n) % 2
    where = torch.randint(size, (n,), generator=generator)
    maps[labels == 1, where[labels == 1], 0] += 3.0
    codes = torch.randint(1, 5, (n, size), generator=generator).float()  # any magnification
    return maps, codes, labels, where


@pytest.mark.parametrize("name", ["mil_attention", "mil_gated_attention"])
def test_attention_finds_the_one_informative_image_of_forty(name):
    """Frozen-encoder path (cached maps): after a short training, the informative image of a
    malignant bag gets the highest attention. Chance would be 1/40 = 2.5 %; the bar is 80 %."""
    cfg = experiment_config(Config(backbone="test_resnet", pretrained="off", feature_dim=16, dropout=0.0,
                                   subtype_head=False, freeze_backbone=True), name)
    torch.manual_seed(0)
    model = build_model(cfg)
    channels = model.backbone.num_features
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        maps, codes, labels, _ = _informative_bags(16, 40, channels, generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(maps, codes).logits, labels.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    maps, codes, labels, where = _informative_bags(64, 40, channels, generator)
    with torch.no_grad():
        out = model(maps, codes)
    malignant = labels == 1
    top = out.instance_weights[malignant].argmax(dim=1)
    assert (top == where[malignant]).float().mean() >= 0.8
    assert ((out.logits > 0).long() == labels).float().mean() >= 0.9


def test_mil_output_does_not_depend_on_the_order_of_the_images():
    cfg = experiment_config(Config(backbone="test_resnet", pretrained="off", image_size=32, feature_dim=16), "mil_gated_attention")
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    x, codes = torch.randn(2, 6, 3, 32, 32), torch.tensor([[1.0, 2, 3, 4, 0, 1], [4, 4, 0, 0, 2, 1]])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a, b = model(x, codes), model(x[:, order], codes[:, order])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.instance_weights[:, order], b.instance_weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.mag_weights.sum(dim=1), torch.ones(2))


def test_mil_evaluation_drops_the_padding_of_a_bag_and_keeps_its_slots():
    from preprocess.dataset import ImageSource
    from utils.engine.train import predict

    cfg = experiment_config(Config(backbone="test_resnet", pretrained="off", image_size=32, feature_dim=16), "mil_attention")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cache = np.random.default_rng(0).integers(0, 256, (9, 32, 49, 3), dtype=np.uint8)
    source = ImageSource(cache, "cpu", mags=np.array([40, 100, 200, 400, 40, 100, 200, 400, 40]))
    bags = np.full((2, 30), -1)
    bags[0, :3], bags[1, :5] = [0, 4, 8], [1, 2, 3, 5, 6]  # padded to 30 slots, as evaluation_bags pads
    seen = []
    real_views = source.views
    source.views = lambda samples, *args: (seen.append(samples.shape[1]), real_views(samples, *args))[1]
    padded = predict(model, source, bags, 1, "none", tta=True)
    assert seen == [3, 5]  # each bag went in without its empty slots
    alone = predict(model, source, bags[1:, :5], 1, "none", tta=True)
    assert np.allclose(padded["prob"][1], alone["prob"][0], atol=1e-6)
    weights = padded["instance_weights"]
    assert weights.shape == (2, 30) and (weights[0, 3:] == 0).all() and np.isclose(weights[0].sum(), 1, atol=1e-5)
    assert np.allclose(weights[1, :5], alone["instance_weights"][0], atol=1e-6)


def test_groups_expand_and_unknown_names_are_one_line(tmp_path):
    from config import GROUPS, parse_args, read_config_file

    cfg = parse_args(["--experiments", "mil,fusion,mmnet"])
    assert cfg.experiments[0] == "mmnet" and cfg.experiments.count("mmnet") == 1
    assert set(cfg.experiments) == set(GROUPS["mil"]) | set(GROUPS["fusion"])
    assert parse_args([]).experiments == GROUPS["default"]
    with pytest.raises(ConfigError, match=r"CFG005.*'fuson'.*did you mean 'fusion'"):
        parse_args(["--experiments", "fuson"])
    path = tmp_path / "run.yaml"
    path.write_text("fusion: gated\nbag_size: 8\nexperiments: [mil]\n")
    values = read_config_file(path)
    cfg = parse_args(["--config", str(path)])
    assert (cfg.fusion, cfg.bag_size, cfg.experiments) == ("gated", 8, GROUPS["mil"])
    path.write_text("fusion: gate\n")
    with pytest.raises(ConfigError, match=r"fusion.*'gate' is not one of.*did you mean 'gated'"):
        parse_args(["--config", str(path)])
    assert values["bag_size"] == 8
    assert dataclasses.replace(cfg, fusion="gated").fusion == "gated"
    with pytest.raises(ConfigError, match="MIL models"):
        parse_args(["--model", "mil_mean"])
    path.write_text("cross_mag_fusion: false\n")  # the config.yaml of the version before fusion by name
    assert parse_args(["--config", str(path)]).fusion == "mean"
    assert np.all([name in GROUPS["all"] for name in GROUPS["fusion"] + GROUPS["mil"]])


def test_a_finished_fold_stays_finished_when_only_another_models_setting_changes():
    """The bag size is part of a MIL model's identity only, the fusion of MMNet's only: a
    `--experiments mil --bag-size 8` after a default study does not retrain MMNet or the baselines."""
    base, other = Config(), Config(bag_size=8, fusion="gated")
    same = lambda name: experiment_config(base, name).training_hash() == experiment_config(other, name).training_hash()
    assert same("single_200x") and same("simple_concat")
    assert not same("mil_attention") and not same("mmnet")
    assert experiment_config(Config(bag_size=8), "mmnet").training_hash() == experiment_config(base, "mmnet").training_hash()


def test_fusion_weight_tables_leave_out_a_fusion_without_weights():
    import pandas as pd

    from utils.report.weights import fusion_weights, magnification_weights

    frame = pd.DataFrame({"patient": ["a", "b"], "prob": [0.2, 0.7]})
    weighted = frame.assign(w_40x=[0.3, 0.5], w_400x=[0.7, 0.5])
    runs = {"mmnet": {"results": [{"fold": 0}], "predictions": [frame]},
            "mmnet_fusion_gated": {"results": [{"fold": 0}], "predictions": [weighted]}}
    assert fusion_weights(runs["mmnet"]).empty  # e.g. `--fusion concat`: no table of zeros or NaN
    table = magnification_weights(runs)
    assert table["experiment"].tolist() == ["mmnet_fusion_gated"]
    assert table[["40X", "400X"]].iloc[0].tolist() == [0.4, 0.6]
    assert fusion_weights(runs["mmnet_fusion_gated"])["40X"].iloc[0] == 0.4


@pytest.mark.parametrize("experiment", ["mmnet_fusion_concat", "mmnet_fusion_gated", "mmnet_fusion_cross_attention",
                                        "mmnet_fusion_bilinear", "mil_max", "mil_gated_attention"])
def test_bf16_autocast_trains_every_kind_of_fusion_and_bag(experiment):
    """The CUDA bf16 path on the CPU: autocast forward, loss and backward stay finite, and the
    magnification weights (where there are any) still sum to 1."""
    from utils.engine.losses import StudyLoss

    cfg = experiment_config(Config(backbone="test_resnet", pretrained="off", image_size=32, feature_dim=16), experiment)
    model = build_model(cfg)
    torch.manual_seed(0)
    slots = 6 if cfg.sample_mode == "bag" else 4
    x = torch.randn(3, slots, 3, 32, 48)
    mask = torch.tensor([[1.0, 2, 3, 4, 0, 2][:slots]] * 3) if cfg.sample_mode == "bag" else torch.ones(3, 4)
    mask[0, 1] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
        loss, _ = StudyLoss(cfg, None)(out, torch.tensor([0, 1, 1]), torch.tensor([0, 4, 7]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if out.mag_weights is not None:
        torch.testing.assert_close(out.mag_weights.float().sum(dim=1), torch.ones(3), atol=1e-2, rtol=0)


def test_bilinear_fusion_multiplies_across_magnifications_and_knows_its_slots():
    """The pooled vector holds products of different magnifications' features (a non-zero mixed
    difference: a sum of per-magnification terms has none), and moving content from one slot to
    another changes the output."""
    from backbones.fusion import create_fusion

    torch.manual_seed(0)
    fusion = create_fusion("bilinear", 16, 4)
    z, mask = torch.randn(2, 4, 16), torch.ones(2, 4)
    e0, e1 = torch.zeros_like(z), torch.zeros_like(z)
    e0[:, 0], e1[:, 1] = torch.randn(2, 16), torch.randn(2, 16)
    f = lambda x: fusion.interactions(x, mask)  # noqa: E731
    mixed = f(z + e0 + e1) - f(z + e0) - f(z + e1) + f(z)
    assert mixed.abs().max() > 1e-4
    swapped = z[:, [1, 0, 2, 3]]
    assert not torch.allclose(fusion(z, mask)[0], fusion(swapped, mask)[0])
    partial = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]])
    other = z.clone()
    other[0, 1] += 3.0  # a missing magnification never reaches the output
    torch.testing.assert_close(fusion(z, partial)[0][0], fusion(other, partial)[0][0])


def test_a_max_over_a_bag_is_scored_on_bags_of_the_trained_size_covering_every_image():
    """A feature-wise max grows with the number of images, so mil_max is scored as it was
    trained: bags of --bag-size that cover every image, the patient's probability their mean.
    The size-invariant aggregators keep one bag of the whole patient."""
    from preprocess.dataset import PatientImages, evaluation_samples
    from utils.engine.evaluate import attention_frame

    data = PatientImages(["big", "small"], np.array([1, 0]), np.array([4, 0]), ["1", "2"],
                         [[np.arange(37)], [np.arange(40, 45)]])
    cfg = experiment_config(Config(bag_size=16), "mil_max")
    bags, owners = evaluation_samples(data, cfg)
    assert bags.shape == (4, 16) and owners.tolist() == [0, 0, 0, 1]  # ceil(37 / 16) = 3 bags
    for bag in bags[:3]:
        assert len(set(bag.tolist())) == 16  # distinct images, as a training bag draws them
    assert set(bags[:3].ravel().tolist()) == set(range(37))  # every image scored at least once
    assert sorted(bags[3][bags[3] >= 0].tolist()) == list(range(40, 45)) and (bags[3, 5:] == -1).all()
    assert np.array_equal(evaluation_samples(data, cfg)[0], bags)  # a fixed set, not a draw
    whole, whole_owners = evaluation_samples(data, experiment_config(Config(bag_size=16), "mil_attention"))
    assert whole.shape == (2, 37) and whole_owners.tolist() == [0, 1]

    # Attention per patient sums to 1 over its bags, an image seen twice counts both times.
    weights = np.where(bags >= 0, 1.0, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    index = pd.DataFrame({"mag": np.full(45, 40), "path": [f"x/{i}.png" for i in range(45)]})
    frame = attention_frame(index, data, (bags, owners), weights)
    assert frame.groupby("patient")["attention"].sum().round(6).to_dict() == {"big": 1.0, "small": 1.0}
    assert len(frame) == 42 and frame.loc[frame.patient == "small", "rank"].tolist() == [1, 2, 3, 4, 5]
    twice = frame.loc[(frame.patient == "big") & (frame.row == bags[2, -1]), "attention"].item()
    assert np.isclose(twice, 2 / 16 / 3)  # in the last bag and in an earlier one
