"""MMNet: a timm backbone per magnification, attention inside each branch, attention across
magnifications, fusion by name, binary and subtype heads. Every component is a flag."""
from __future__ import annotations

import torch
from torch import nn

from backbones import ModelOutput, StudyModel, feature_map, magnification_backbones, map_channels, register
from backbones.fusion import create_fusion
from backbones.our.modules import ChannelAttention, HierarchicalMagnificationAttention, MultiScaleAttentionPool, SpatialAttention


class MagnificationBranch(nn.Module):
    """Backbone feature map -> spatial attention -> channel attention -> pooled vector."""

    def __init__(self, backbone: nn.Module, dim: int, spatial: bool, channel: bool, multiscale: bool):
        super().__init__()
        channels = map_channels(backbone)
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


class MMNet(StudyModel):
    def __init__(self, backbones: nn.ModuleList, cfg, pretrained_status: str = ""):
        super().__init__(cfg, backbones[0], pretrained_status)
        self.branches = nn.ModuleList([
            MagnificationBranch(b, cfg.feature_dim, cfg.spatial_attention, cfg.channel_attention,
                                cfg.multiscale_pooling) for b in backbones])
        self.hierarchy = (HierarchicalMagnificationAttention(cfg.feature_dim, len(backbones))
                          if cfg.hierarchical_attention else None)
        self.fusion = create_fusion(cfg.fusion, cfg.feature_dim, len(backbones))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> ModelOutput:
        """x: (B, M, 3, H, W) normalised images; mask: (B, M), 1 where the image exists."""
        vectors, maps = [], []
        for m, branch in enumerate(self.branches):
            vector, attention = branch(x[:, m])
            vectors.append(vector)
            maps.append(attention)
        z = torch.stack(vectors, dim=1)  # (B, M, D)
        hierarchy = None
        if self.hierarchy is not None and not self.training:
            z, hierarchy = self.hierarchy(z, mask, with_weights=True)
        elif self.hierarchy is not None:
            z = self.hierarchy(z, mask)
        fused, weights = self.fusion(z, mask)
        logits, subtype_logits = self.heads(fused)
        attention_maps = torch.stack(maps, dim=1) if maps[0] is not None else None
        return ModelOutput(logits, subtype_logits, weights, attention_maps, hierarchy_weights=hierarchy)


@register("mmnet")
def build_mmnet(cfg) -> MMNet:
    backbones, status = magnification_backbones(cfg, len(cfg.magnifications))
    return MMNet(backbones, cfg, status)
