"""Baseline: one backbone on one image (one magnification, or all magnifications pooled).
A patient's probability is the mean over that patient's images."""
from __future__ import annotations

import torch
from torch import nn

from backbones import ModelOutput, StudyModel, create_backbone, feature_map, map_channels, register


class SingleImageNet(StudyModel):
    def __init__(self, backbone: nn.Module, cfg, pretrained_status: str = ""):
        super().__init__(cfg, backbone, pretrained_status)
        self.backbone = backbone
        self.project = nn.Sequential(nn.Linear(map_channels(backbone), cfg.feature_dim),
                                     nn.LayerNorm(cfg.feature_dim), nn.GELU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> ModelOutput:
        """x: (B, 1, 3, H, W); the single slot is the one image of the sample."""
        features = feature_map(self.backbone, x[:, 0].contiguous(memory_format=torch.channels_last))
        logits, subtype_logits = self.heads(self.project(features.mean(dim=(2, 3))))
        return ModelOutput(logits, subtype_logits, mask[:, :1])


@register("single")
def build_single(cfg) -> SingleImageNet:
    backbone, status = create_backbone(cfg)
    return SingleImageNet(backbone, cfg, status)
