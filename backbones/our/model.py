"""MMNet: a timm backbone per magnification, attention inside each branch, attention across
magnifications, fusion by name, binary and subtype heads. Every component is a flag."""
from __future__ import annotations

import functools

import torch
from torch import nn

from backbones import ModelOutput, StudyModel, feature_map, magnification_backbones, map_channels, register
from backbones.fusion import create_fusion
from backbones.grouped import branch_slices, group, join_state, split_state
from backbones.our.modules import (
    ChannelAttention,
    HierarchicalMagnificationAttention,
    MultiScaleAttentionPool,
    SpatialAttention,
    gate_channels,
    pool_cells,
)


class MagnificationBranch(nn.Module):
    """Backbone feature map -> spatial attention -> channel attention -> pooled vector. Without a
    backbone of its own, MMNet runs the branch side by side with the others on its grouped network."""

    def __init__(self, backbone: nn.Module | None, channels: int, dim: int, spatial: bool, channel: bool,
                 multiscale: bool):
        super().__init__()
        self.backbone = backbone
        self.spatial = SpatialAttention(channels) if spatial else None
        self.channel = ChannelAttention(channels) if channel else None
        self.pool = MultiScaleAttentionPool(channels, dim, enabled=multiscale)

    def forward(self, x: torch.Tensor):
        features = feature_map(self.backbone, x.contiguous(memory_format=torch.channels_last))
        attention = None
        if self.spatial is not None:
            features, attention = self.spatial(features)
        if self.channel is not None:
            features = self.channel(features)
        return self.pool(features), attention


def branch_state_names(count: int) -> dict:
    """Where the grouped encoder lives and where a saved state holds each of the `count`
    branches' encoders: split_state's and join_state's names."""
    return dict(grouped_name="grouped_backbone", branch_key="branches.{}.backbone", count=count)


class MMNet(StudyModel):
    def __init__(self, backbones: nn.ModuleList, cfg, pretrained_status: str = ""):
        super().__init__(cfg, backbones[0], pretrained_status)
        # One grouped network where the encoders allow it (backbones/grouped.py): the same maps
        # in a quarter of the launches; saved states keep one encoder per branch either way.
        self.grouped_backbone = group(list(backbones)) if cfg.grouped_branches == "on" else None
        own = [None] * len(backbones) if self.grouped_backbone is not None else backbones
        self.branches = nn.ModuleList([
            MagnificationBranch(b, map_channels(backbones[0]), cfg.feature_dim, cfg.spatial_attention,
                                cfg.channel_attention, cfg.multiscale_pooling) for b in own])
        if self.grouped_backbone is not None:
            names = branch_state_names(len(backbones))
            self._register_state_dict_hook(functools.partial(_split_hook, **names))
            self._register_load_state_dict_pre_hook(functools.partial(_join_hook, **names))
        self.hierarchy = (HierarchicalMagnificationAttention(cfg.feature_dim, len(backbones))
                          if cfg.hierarchical_attention else None)
        self.fusion = create_fusion(cfg.fusion, cfg.feature_dim, len(backbones))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> ModelOutput:
        """x: (B, M, 3, H, W) normalised images; mask: (B, M), 1 where the image exists."""
        z, attention_maps = self._branch_vectors(x)  # (B, M, D), (B, M, h, w) or None
        hierarchy = None
        if self.hierarchy is not None and not self.training:
            z, hierarchy = self.hierarchy(z, mask, with_weights=True)
        elif self.hierarchy is not None:
            z = self.hierarchy(z, mask)
        fused, weights = self.fusion(z, mask)
        logits, subtype_logits = self.heads(fused)
        return ModelOutput(logits, subtype_logits, weights, attention_maps, hierarchy_weights=hierarchy)

    def _branch_vectors(self, x: torch.Tensor):
        """Every branch's vector and spatial attention: each branch on its own encoder, or every
        branch side by side on the grouped network's maps (one set of operators for the encoders,
        the channel attention and the pooling; the spatial attention on each branch's channels)."""
        if self.grouped_backbone is None:
            vectors, maps = zip(*[branch(x[:, m]) for m, branch in enumerate(self.branches)])
            return torch.stack(vectors, dim=1), (torch.stack(maps, dim=1) if maps[0] is not None else None)
        features = feature_map(self.grouped_backbone, x.flatten(1, 2).contiguous(memory_format=torch.channels_last))
        attention = None
        if self.branches[0].spatial is not None:
            slices = branch_slices(self.grouped_backbone, len(self.branches))
            parts = [branch.spatial(features[:, channels]) for branch, channels in zip(self.branches, slices)]
            features = torch.cat([weighted for weighted, _ in parts], dim=1)
            attention = torch.stack([weights for _, weights in parts], dim=1)
        if self.branches[0].channel is not None:
            features = gate_channels([branch.channel for branch in self.branches], features)
        return pool_cells([branch.pool for branch in self.branches], features), attention


def _split_hook(module, state, prefix, *_, **names) -> None:
    split_state(state, prefix, **names)


def _join_hook(state, prefix, *_, **names) -> None:  # torch's pre-hook arguments after the prefix: unused
    join_state(state, prefix, **names)


@register("mmnet")
def build_mmnet(cfg) -> MMNet:
    backbones, status = magnification_backbones(cfg, len(cfg.magnifications))
    return MMNet(backbones, cfg, status)
