"""MMNet's per-magnification CNN encoders run as one network: every convolution becomes a grouped
convolution over the branches' channels side by side, every BatchNorm one layer over all of them.

Convolutions with groups, BatchNorm, activations, pooling and residual sums act on each channel
(or each group of channels) alone, so branch m's channels [m*C, (m+1)*C) of the grouped network
compute exactly what branch m's own network computes: the same math in a quarter of the operator
launches (a training step of four resnet18 branches dispatches ~1,150 operators for the encoders
alone, grouped ~290). A network that mixes channels (LayerNorm over channels, a channel concat,
attention) cannot be grouped: group() checks every network by running it both ways once.

State dicts keep the per-branch layout ('branches.0.backbone.conv1.weight', ...): the grouped
weights are split on saving and joined on loading, so kept fold models, checkpoints and their
readers do not depend on how the branches run.
"""
from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import nn

from backbones.encoder import FROZEN_ATTRIBUTE, feature_map, is_token_model

log = logging.getLogger("mmnet")
CHECK_SIDE = 64  # pixels of the random frames group() checks a grouped network with
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_TIMM_ELEMENTWISE = {"GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardSigmoid", "HardMish", "Flatten"}


def group(backbones: list[nn.Module]) -> nn.Module | None:
    """The branches as one grouped network, or None (said once per reason) where they must run
    one by one."""
    reason = _why_not(backbones)
    grouped = None if reason else _widened(backbones)
    if grouped is not None and not _same_maps(grouped, backbones):
        grouped, reason = None, "the grouped network's maps differ from the branches' (it mixes channels)"
    if reason:
        _say_once(reason)
    return grouped


@functools.cache
def _say_once(reason: str) -> None:
    log.info("MMNet runs its magnifications' encoders one by one: %s", reason)


def _why_not(backbones: list[nn.Module]) -> str:
    if len(backbones) < 2:
        return "one branch"
    if len({id(b) for b in backbones}) < len(backbones):
        return "the branches share one encoder"
    if any(getattr(b, FROZEN_ATTRIBUTE, False) for b in backbones):
        return "a frozen encoder"
    if is_token_model(backbones[0]):
        return "a transformer's tokens mix channels"
    for name, module in backbones[0].named_modules():
        if next(module.children(), None) is None and not _per_channel(module):
            return f"layer {name or '(root)'} ({type(module).__name__}) is not known to act per channel"
    return ""


def _per_channel(layer: nn.Module) -> bool:
    """A layer without children that acts on each channel (or group of channels) alone: torch's,
    or timm's weightless activation wrappers."""
    if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, *_ELEMENTWISE)):
        return True
    return type(layer).__name__ in _TIMM_ELEMENTWISE and next(layer.parameters(), None) is None


def _widened(backbones: list[nn.Module]) -> nn.Module:
    """A copy of the first network whose convolutions and BatchNorms hold every branch's weights."""
    grouped = copy.deepcopy(backbones[0])
    layers = [dict(b.named_modules()) for b in backbones]
    for name, module in list(grouped.named_modules()):
        if isinstance(module, nn.Conv2d):
            wide = _wide_conv(module, [layer[name] for layer in layers])
        elif isinstance(module, nn.BatchNorm2d):
            wide = _wide_norm(module, [layer[name] for layer in layers])
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(grouped.get_submodule(parent) if parent else grouped, leaf, wide)
    grouped.num_features = backbones[0].num_features * len(backbones)
    grouped.branch_channels = backbones[0].num_features
    return grouped


def _wide_conv(template: nn.Conv2d, convs: list[nn.Conv2d]) -> nn.Conv2d:
    count = len(convs)
    wide = copy.deepcopy(template)
    wide.in_channels, wide.out_channels, wide.groups = (template.in_channels * count, template.out_channels * count,
                                                        template.groups * count)
    wide.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
    if template.bias is not None:
        wide.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs]))
    return wide


def _wide_norm(template: nn.BatchNorm2d, norms: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    wide = copy.deepcopy(template)  # timm's BatchNormAct2d keeps its activation; hooks stay
    wide.num_features = template.num_features * len(norms)
    for name in ("weight", "bias"):
        if getattr(template, name) is not None:
            setattr(wide, name, nn.Parameter(torch.cat([getattr(n, name).detach() for n in norms])))
    for name in ("running_mean", "running_var"):
        if getattr(template, name) is not None:
            setattr(wide, name, torch.cat([getattr(n, name) for n in norms]))
    return wide


@torch.no_grad()
def _same_maps(grouped: nn.Module, backbones: list[nn.Module]) -> bool:
    """Every branch's maps equal its channels of the grouped maps (evaluation mode, random frames
    from a private generator: the process's random stream is not touched)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, len(backbones), 3, CHECK_SIDE, CHECK_SIDE, generator=generator)
    modes = [b.training for b in backbones]
    try:
        for network in (grouped, *backbones):
            network.eval()
        expected = torch.cat([feature_map(b, x[:, m]) for m, b in enumerate(backbones)], dim=1)
        got = feature_map(grouped, x.flatten(1, 2))
    finally:
        for network, mode in zip(backbones, modes):
            network.train(mode)
        grouped.train(modes[0])
    scale = float(expected.abs().max()) + 1e-6
    return got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-4 * scale


def branch_slices(grouped: nn.Module, count: int) -> list[slice]:
    """The channels of each branch in the grouped maps."""
    width = grouped.branch_channels
    return [slice(m * width, (m + 1) * width) for m in range(count)]


def split_state(state: dict, prefix: str, grouped_name: str, branch_key: str, count: int) -> None:
    """state_dict hook: the grouped weights as each branch's ('{prefix}branches.m.backbone.X')."""
    head = f"{prefix}{grouped_name}."
    for key in [k for k in state if k.startswith(head)]:
        value = state.pop(key)
        for m, part in enumerate(value.chunk(count) if value.dim() else [value] * count):
            state[f"{prefix}{branch_key.format(m)}.{key[len(head):]}"] = part.clone()


def join_state(state: dict, prefix: str, grouped_name: str, branch_key: str, count: int) -> None:
    """load_state_dict pre-hook: the branches' weights joined into the grouped network's."""
    heads = [f"{prefix}{branch_key.format(m)}." for m in range(count)]
    for key in [k for k in state if k.startswith(heads[0])]:
        rest = key[len(heads[0]):]
        if all(h + rest in state for h in heads):  # otherwise left as it is: load_state_dict names it
            parts = [state.pop(h + rest) for h in heads]
            state[f"{prefix}{grouped_name}.{rest}"] = torch.cat(parts) if parts[0].dim() else parts[0]
