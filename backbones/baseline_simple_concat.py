"""Baseline: per-magnification backbones, globally pooled features concatenated, MLP head.
No attention of any kind: what MMNet's attention and fusion must beat."""
from __future__ import annotations

import torch
from torch import nn

from backbones import ModelOutput, StudyModel, feature_map, magnification_backbones, map_channels, register


class SimpleConcatNet(StudyModel):
    def __init__(self, backbones: nn.ModuleList, cfg, pretrained_status: str = ""):
        super().__init__(cfg, backbones[0], pretrained_status)
        self.backbones = backbones
        width = map_channels(backbones[0]) * len(backbones)
        self.mlp = nn.Sequential(nn.Linear(width, cfg.feature_dim), nn.LayerNorm(cfg.feature_dim), nn.GELU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> ModelOutput:
        pooled = [feature_map(b, x[:, m].contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))
                  for m, b in enumerate(self.backbones)]
        # A missing magnification contributes zeros, not the features of a black image.
        features = torch.cat([p * mask[:, m:m + 1].to(p.dtype) for m, p in enumerate(pooled)], dim=1)
        logits, subtype_logits = self.heads(self.mlp(features))
        weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return ModelOutput(logits, subtype_logits, weights)


@register("simple_concat")
def build_simple_concat(cfg) -> SimpleConcatNet:
    backbones, status = magnification_backbones(cfg, len(cfg.magnifications))
    return SimpleConcatNet(backbones, cfg, status)
