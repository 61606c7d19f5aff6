"""A fold's AdamW (the fused kernel where torch has it) and its warm-up + cosine schedule."""
from __future__ import annotations

import math

import torch

from utils.device import torch_release


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; pretrained backbones learn at lr * backbone_lr_scale, new layers at lr."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if "backbone" in name else rest).append(param)
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": rest, "lr": cfg.lr}]
    groups = [g for g in groups if g["params"]]
    if has_fused_adamw(next(model.parameters()).device.type):
        try:  # one fused kernel for all parameters (on the CPU 4x the per-parameter loop)
            return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
        except RuntimeError:  # a build without the kernel: the multi-tensor update below
            pass
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, foreach=True)


# Where torch has the fused AdamW kernel: CUDA always, the CPU from 2.4, MPS from 2.5. torch 2.1
# accepts fused=True on the CPU and fails only at the first step, so the version decides.
FUSED_ADAMW_SINCE = {"cuda": (2, 0), "cpu": (2, 4), "mps": (2, 5)}


def has_fused_adamw(device: str) -> bool:
    return device in FUSED_ADAMW_SINCE and torch_release() >= FUSED_ADAMW_SINCE[device]


def make_scheduler(optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 1 % of the peak, stepped once per batch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
