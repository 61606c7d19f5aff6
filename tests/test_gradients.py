"""GradientSum (the loop's gradients without backward()) against loss.backward() as the oracle."""
import pytest
import torch

from backbones import build_model
from config import Config, experiment_config
from tests.conftest import model_inputs
from utils.engine.gradients import GradientSum, same_layout

TINY = Config(backbone="test_resnet", pretrained="off", image_size=32, feature_dim=16)


def _micro_batches(cfg, count=2):
    """count different micro-batches of the model's input kind, a missing slot in each."""
    return [model_inputs(cfg, size=cfg.image_size, seed=seed) for seed in range(count)]


def _loss(output, index: int) -> torch.Tensor:
    """Micro-batch 0 reaches the binary head only, so the subtype head's parameters first get
    no gradient and then one: both of backward()'s paths for a parameter."""
    loss = output.logits.float().square().mean()
    if index and output.subtype_logits is not None:
        loss = loss + output.subtype_logits.float().log_softmax(-1)[:, 0].mean()
    return loss


def _gradients(model, batches, use_backward: bool) -> dict:
    model.zero_grad(set_to_none=True)
    summed = GradientSum(model.parameters())
    for index, (x, mask) in enumerate(batches):
        torch.manual_seed(10 + index)  # the same dropout masks on both sides
        loss = _loss(model(x, mask), index)
        loss.backward() if use_backward else summed.add(loss)
    if not use_backward:
        summed.store()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("experiment", ["mmnet", "single_200x", "mil_attention"])
def test_summed_gradients_equal_backward_over_micro_batches(experiment):
    cfg = experiment_config(TINY, experiment)
    model = build_model(cfg).train()
    batches = _micro_batches(cfg)
    expected = _gradients(model, batches, use_backward=True)
    got = _gradients(model, batches, use_backward=False)
    assert expected.keys() == got.keys()
    assert any(g is None for g in expected.values()) == any(g is None for g in got.values())
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
            continue
        assert same_layout(got[name], grad), name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    stored = [g.data_ptr() for g in got.values() if g is not None and g.numel()]
    assert len(stored) == len(set(stored))  # every parameter owns its gradient's memory


def test_a_shared_or_expanded_gradient_is_copied_before_it_is_stored():
    """y = a + b hands both parameters the same gradient tensor, and c.sum() hands c a stride-0
    expanded one: stored as they are, clipping would scale the shared memory twice and the fused
    optimizer would read the wrong layout. Clipping then matches backward()'s gradients."""
    def run(use_backward: bool):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(4)) for _ in range(3))
        loss = ((a + b) * torch.arange(4.0)).sum() + c.sum()
        if use_backward:
            loss.backward()
        else:
            summed = GradientSum([a, b, c])
            raw = torch.autograd.grad(loss, [a, b, c], retain_graph=True)
            assert raw[0] is raw[1] and raw[2].stride() == (0,)  # the cases this test is about
            summed.add(loss)
            summed.store()
        torch.nn.utils.clip_grad_norm_([a, b, c], 1.0)
        return a.grad, b.grad, c.grad
    expected, got = run(True), run(False)
    assert got[0].data_ptr() != got[1].data_ptr()
    assert got[2].stride() == (1,)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs)
