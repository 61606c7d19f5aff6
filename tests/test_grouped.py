"""MMNet's branches side by side (backbones/grouped.py and the grouped attention in
backbones/our/modules.py): the same network as branch by branch, in outputs, gradients,
BatchNorm statistics, saved states and Grad-CAM; refused where channels mix."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import build_model
from backbones.grouped import group, split_state
from backbones.our.gradcam import cam_maps
from backbones.our.model import branch_state_names
from backbones.our.modules import ChannelAttention, MultiScaleAttentionPool
from config import Config
from tests.conftest import model_inputs
from utils.engine.losses import StudyLoss

CFG = Config(backbone="resnet18", pretrained="off", image_size=64, feature_dim=16)


def _pair(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """The grouped MMNet and one with the same weights that runs its branches one by one
    (--grouped-branches off)."""
    torch.manual_seed(0)
    grouped = build_model(cfg)
    apart = build_model(dataclasses.replace(cfg, grouped_branches="off"))
    apart.load_state_dict(grouped.state_dict())
    for module in [*grouped.modules(), *apart.modules()]:  # timm zero-inits the last gamma of each block
        if isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 0.7)
    assert grouped.grouped_backbone is not None and apart.grouped_backbone is None
    return grouped, apart


def _gradients(model: nn.Module, x, mask) -> dict:
    model.train()
    torch.manual_seed(1)  # the heads' dropout draws the same units for both networks
    loss = StudyLoss(CFG, None)(model(x, mask), torch.tensor([0, 1, 1]), torch.tensor([0, 4, 7]))[0]
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = dict(zip(names, torch.autograd.grad(loss, params)))
    split_state(grads, "", **branch_state_names(4))  # the grouped encoder's gradients under each branch's names
    return grads


@pytest.mark.parametrize("flags", [{}, dict(spatial_attention=False, channel_attention=False, multiscale_pooling=False)])
def test_grouped_branches_are_the_branch_by_branch_network(flags):
    """Outputs in evaluation, gradients of every parameter and the BatchNorm statistics a training
    forward leaves: equal to the branch-by-branch network's (a missing magnification included)."""
    cfg = dataclasses.replace(CFG, **flags)
    grouped, apart = _pair(cfg)
    x, mask = model_inputs(cfg, batch=3, size=64, seed=0)
    mask[1, 2] = 0
    grouped.eval(), apart.eval()
    with torch.no_grad():
        mine, theirs = grouped(x, mask), apart(x, mask)
    for field in ("logits", "subtype_logits", "mag_weights", "attention_maps", "hierarchy_weights"):
        if getattr(theirs, field) is not None:
            torch.testing.assert_close(getattr(mine, field), getattr(theirs, field), rtol=1e-4, atol=1e-5)
    g_mine, g_theirs = _gradients(grouped, x, mask), _gradients(apart, x, mask)
    assert g_mine.keys() == g_theirs.keys() and len(g_mine) > 100
    for name in g_theirs:
        torch.testing.assert_close(g_mine[name], g_theirs[name], rtol=1e-3, atol=1e-5, msg=name)
    state_mine, state_theirs = grouped.state_dict(), apart.state_dict()
    assert state_mine.keys() == state_theirs.keys()  # saved states keep one encoder per branch
    for name in state_theirs:
        torch.testing.assert_close(state_mine[name], state_theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_saved_state_loads_into_either_layout_and_a_partial_one_is_named():
    grouped, apart = _pair(CFG)
    state = apart.state_dict()
    grouped.load_state_dict(state)  # per-branch keys join into the grouped network
    assert grouped.state_dict().keys() == state.keys()
    del state["branches.3.backbone.conv1.weight"]
    with pytest.raises(RuntimeError, match="branches.0.backbone.conv1.weight"):  # left as it was, not lost
        grouped.load_state_dict(state)


def test_grad_cam_of_each_magnification_is_its_branchs():
    grouped, apart = _pair(CFG)
    x, _ = model_inputs(CFG, batch=1, size=64, seed=1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    mine, theirs = cam_maps(grouped, x, mask), cam_maps(apart, x, mask)
    assert mine[2].max() == 0 and mine[[0, 1, 3]].max() > 0.5
    assert abs(mine - theirs).max() < 1e-4


class _ChannelMixer(nn.Module):
    """Per-channel layers only, but the forward concatenates channels (DenseNet-like)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.num_features = 8

    def forward_features(self, x):
        y = self.conv(x)
        return torch.cat([y, y.flip(1)], dim=1)


def test_networks_that_mix_channels_or_share_an_encoder_run_apart():
    """A forward that mixes channels is caught by running both ways; a layer that is not known to
    act per channel, a shared encoder and a transformer are refused before that."""
    assert group([_ChannelMixer(), _ChannelMixer()]) is None
    shared = nn.Sequential(nn.Conv2d(3, 4, 1))
    assert group([shared, shared]) is None
    norm = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    assert group([norm, copy.deepcopy(norm)]) is None
    mixers = [_ChannelMixer(), _ChannelMixer()]
    state = torch.get_rng_state()
    assert group(mixers) is None
    assert torch.equal(torch.get_rng_state(), state)  # the check draws from a private generator


def test_channel_attention_and_pooling_equal_their_plain_definitions():
    """The grouped forms (one branch here) against the textbook modules: two MLP calls, and
    adaptive pooling with a softmax per grid; values and gradients, maps of any size."""
    torch.manual_seed(0)
    channel, pool = ChannelAttention(32), MultiScaleAttentionPool(32, 8)
    for height, width in [(2, 2), (7, 7), (7, 11)]:
        x = torch.randn(3, 32, height, width).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        for mine, theirs in [(channel(x), _plain_channel(channel, x)), (pool(x), _plain_pool(pool, x))]:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
            weights = torch.randn_like(theirs)
            torch.testing.assert_close(torch.autograd.grad((mine * weights).sum(), x)[0],
                                       torch.autograd.grad((theirs * weights).sum(), x)[0], rtol=1e-4, atol=1e-6)


def _plain_channel(module: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    gate = torch.sigmoid(module.mlp(x.mean(dim=(2, 3))) + module.mlp(x.amax(dim=(2, 3))))
    return x * gate[:, :, None, None]


def _plain_pool(module: MultiScaleAttentionPool, x: torch.Tensor) -> torch.Tensor:
    vectors = []
    for grid, scorer in zip(module.grids, module.scorers):
        cells = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)  # (B, g*g, C)
        weights = torch.softmax(scorer(cells), dim=1) if grid > 1 else torch.ones_like(cells[..., :1])
        vectors.append((weights * cells).sum(dim=1))
    return module.project(torch.cat(vectors, dim=1))
