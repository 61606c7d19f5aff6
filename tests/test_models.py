"""Every registered model and every MMNet flag combination: shapes, finiteness, gradients, masking."""
import dataclasses
import itertools

import pytest
import torch

from backbones import build_model, list_models
from config import EXPERIMENTS, Config, experiment_config
from tests.conftest import model_inputs as _inputs
from utils.engine.losses import StudyLoss

# 64 px gives test_resnet 2x2 feature maps: the smallest on which spatial pooling means anything.
TINY = Config(backbone="test_resnet", pretrained="off", image_size=64, feature_dim=16)
FLAGS = ("spatial_attention", "channel_attention", "hierarchical_attention",
         "multiscale_pooling", "shared_backbone", "subtype_head")


def _check_forward_backward(cfg):
    model = build_model(cfg)
    x, mask = _inputs(cfg)
    out = model(x, mask)
    assert out.logits.shape == (3,)
    if out.mag_weights is not None:  # left out by fusions that mix magnifications inside the vector
        assert out.mag_weights.shape == (3, 1 if cfg.model == "single" else len(cfg.magnifications))
        assert torch.isfinite(out.mag_weights).all()
    assert torch.isfinite(out.logits).all()
    if cfg.subtype_head:
        assert out.subtype_logits.shape == (3, 8)
    else:
        assert out.subtype_logits is None
    loss, _ = StudyLoss(cfg, None)(out, torch.tensor([0, 1, 1]), torch.tensor([0, 4, 7]))
    # Full mask for the gradient check: every branch must then receive a gradient. timm's
    # residual blocks zero-init their last BN gamma, which blocks gradients at step 0 by
    # design; set gammas to 1 so the check tests connectivity, not the init scheme.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    model.zero_grad()
    out_full = model(x, torch.ones_like(mask))
    StudyLoss(cfg, None)(out_full, torch.tensor([0, 1, 1]), torch.tensor([0, 4, 7]))[0].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing[:5]}"
    assert torch.isfinite(loss)
    return model


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_experiment_model(experiment):
    cfg = experiment_config(TINY, experiment)
    assert cfg.model in list_models()
    _check_forward_backward(cfg)


def test_every_mmnet_flag_combination():
    for values in itertools.product((True, False), repeat=len(FLAGS)):
        cfg = dataclasses.replace(TINY, **dict(zip(FLAGS, values)))
        _check_forward_backward(cfg)


@pytest.mark.parametrize("experiment", ["mmnet", "simple_concat", "mmnet_fusion_concat", "mil_attention"])
def test_missing_magnification_is_masked(experiment):
    cfg = experiment_config(TINY, experiment)
    model = build_model(cfg).eval()
    x, mask = _inputs(cfg)
    with torch.no_grad():
        out = model(x, mask)
        x_other = x.clone()
        x_other[0, 0] = torch.randn_like(x_other[0, 0]) * 5  # whatever sits in the missing slot
        out_other = model(x_other, mask)
    if out.mag_weights is not None:
        assert out.mag_weights[0, 0] == 0
        assert torch.allclose(out.mag_weights.sum(dim=1), torch.ones(3))
    assert torch.allclose(out.logits[0], out_other.logits[0], atol=1e-5)


def test_dropout_and_batchnorm_follow_eval():
    model = build_model(TINY)
    x, mask = _inputs(TINY)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, mask).logits, model(x, mask).logits)


def test_shared_backbone_has_one_set_of_weights():
    shared = build_model(dataclasses.replace(TINY, shared_backbone=True))
    separate = build_model(TINY)
    count = lambda m: sum(p.numel() for p in m.parameters())
    backbone = sum(p.numel() for p in shared.branches[0].backbone.parameters())
    assert count(separate) - count(shared) == 3 * backbone


def test_pretrained_file_is_loaded(tmp_path):
    import timm

    from backbones import create_backbone

    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="")
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    backbone, status = create_backbone(dataclasses.replace(TINY, pretrained_file=str(tmp_path / "weights.pth")))
    assert status.startswith("pretrained")
    for a, b in zip(backbone.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_pretrained_weights_are_read_once_per_process_and_every_build_is_the_same(tmp_path, monkeypatch):
    """A study builds four branches per fold model and a model per job: the weights file is read
    by the first build only; later builds hold the same weights, and the random stream after a
    build is the same as after the first (the model's own init runs either way)."""
    import timm

    import backbones

    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="")
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    monkeypatch.setattr(backbones, "_PRETRAINED", {})
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args[0]) or real_load(*args, **kwargs))
    cfg = dataclasses.replace(TINY, pretrained_file=str(tmp_path / "weights.pth"))
    after = []
    for _ in range(3):
        torch.manual_seed(0)
        backbone, status = backbones.create_backbone(cfg)
        after.append(torch.rand(3))
        assert status.startswith("pretrained")
        for a, b in zip(backbone.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(a, b)
    assert len(reads) == 1
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])


def test_unavailable_weights_stop_with_what_to_do(monkeypatch):
    """Weights that are wanted and cannot be loaded never become a silent random init."""
    import timm

    import backbones

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(backbones.WeightsError, match=r"--pretrained-file PATH .* or --pretrained off") as err:
        backbones.check_weights(dataclasses.replace(TINY, pretrained="on"))
    assert len(str(err.value).splitlines()) == 1
    assert backbones.check_weights(dataclasses.replace(TINY, pretrained="off")) == "random init"


def test_progressive_attention_respects_the_magnification_order():
    """Refined level m depends on inputs 0..m only: zero gradient from every higher level."""
    from backbones.our.modules import HierarchicalMagnificationAttention

    torch.manual_seed(0)
    module = HierarchicalMagnificationAttention(16, 4)
    z = torch.randn(3, 4, 16, requires_grad=True)
    refined = module(z, torch.ones(3, 4))
    probe = torch.randn(16)  # not a plain sum: a LayerNorm output always sums to the same value
    for level in range(4):
        grad, = torch.autograd.grad((refined[:, level] * probe).sum(), z, retain_graph=True)
        assert (grad[:, level + 1:] == 0).all(), level
        assert all(grad[:, lower].abs().max() > 0 for lower in range(level + 1)), level


def test_progressive_attention_ignores_a_missing_lower_level():
    from backbones.our.modules import HierarchicalMagnificationAttention

    torch.manual_seed(0)
    module = HierarchicalMagnificationAttention(16, 4)
    z = torch.randn(2, 4, 16)
    mask = torch.tensor([[0.0, 1, 1, 1], [0, 0, 0, 1]])
    other = z.clone()
    other[:, 0] += 5.0  # change the missing 40X slot only
    a, b = module(z, mask), module(other, mask)
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
    assert torch.isfinite(a).all()


def test_every_hierarchy_level_has_a_real_choice_so_query_and_key_weights_learn():
    """With 40X and 100X only, 100X chooses between 40X and itself: the attention's query and
    key projections receive gradient (with 40X as the only key its weight was always 1)."""
    from backbones.our.modules import HierarchicalMagnificationAttention

    torch.manual_seed(0)
    module = HierarchicalMagnificationAttention(16, 2)
    refined = module(torch.randn(3, 2, 16), torch.ones(3, 2))
    (refined[:, 1] * torch.randn(16)).sum().backward()
    key_rows = module.key_value.weight.grad[:16]  # the key half of the key/value projection
    assert module.query.weight.grad.abs().max() > 0
    assert key_rows.abs().max() > 0


@pytest.mark.parametrize("experiment", ["mmnet", "mil_attention", "single_200x"])
def test_every_view_in_one_forward_gives_each_views_own_forward(experiment):
    """Evaluation runs the test-time views as one batch: the oracle is one forward per view
    (the mean of their probabilities and weights, the plain view's own probability)."""
    from preprocess.image_source import TTA_FLIPS
    from utils.engine.train import view_means

    cfg = experiment_config(TINY, experiment)
    model = build_model(cfg).eval()
    x, mask = _inputs(cfg)
    views = [(x.flip([d + 1 for d in dims]) if dims else x, mask) for dims in TTA_FLIPS]
    assert len(views) > 1
    with torch.inference_mode():  # every view in one forward, as evaluation runs them (train.views_forward)
        got = view_means(model(torch.cat([v for v, _ in views]), torch.cat([m for _, m in views])), tta=True)
    with torch.inference_mode():
        outputs = [model(*view) for view in views]
    probs = torch.stack([torch.sigmoid(o.logits) for o in outputs])
    torch.testing.assert_close(got["prob"], probs.mean(0))
    torch.testing.assert_close(got["prob_plain"], probs[0])
    for key in ("mag_weights", "instance_weights"):
        values = [getattr(o, key) for o in outputs]
        if values[0] is not None:
            torch.testing.assert_close(got[key], torch.stack(values).mean(0))
    if outputs[0].subtype_logits is not None:
        torch.testing.assert_close(got["subtype_prob"], torch.stack([o.subtype_logits.softmax(-1) for o in outputs]).mean(0))


def test_batchnorm_without_its_counter_gives_the_same_outputs_and_loads_old_state():
    """build_model drops num_batches_tracked (one add_ per layer and step): the same network with
    the counters, from the same seed, gives the same training outputs and running statistics
    over two steps, and its state dict (counters and all) loads strictly into the new one."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from backbones import MODEL_REGISTRY

    cfg = dataclasses.replace(TINY, backbone="resnet18")
    torch.manual_seed(3)
    counted = MODEL_REGISTRY.create(cfg.model, cfg)
    torch.manual_seed(3)
    uncounted = build_model(cfg)
    norms = [m for m in uncounted.modules() if isinstance(m, _BatchNorm)]
    assert len(norms) == 20 + 4  # the four resnet18 branches side by side, and each branch's spatial attention
    assert all(m.num_batches_tracked is None for m in norms)
    assert not any(k.endswith("num_batches_tracked") for k in uncounted.state_dict())
    x, mask = _inputs(cfg)
    for model in (counted, uncounted):
        model.train()
    for step in range(2):
        outputs = []
        for model in (counted, uncounted):
            torch.manual_seed(step)  # the heads' dropout draws the same masks
            outputs.append(model(x, mask).logits)
        assert torch.equal(*outputs)
    statistics = dict(uncounted.named_buffers())
    assert all(torch.equal(value, statistics[name]) for name, value in counted.named_buffers()
               if not name.endswith("num_batches_tracked"))
    state = counted.state_dict()
    assert sum(k.endswith("num_batches_tracked") for k in state) == 4 * 20 + 4  # saved branch by branch
    uncounted.load_state_dict(state, strict=True)  # an earlier checkpoint: the counters are dropped
