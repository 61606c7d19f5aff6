"""MMNet building blocks: spatial and channel attention, multi-scale attention pooling,
hierarchical magnification attention, cross-magnification fusion."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialAttention(nn.Module):
    """Depthwise convolutions -> one sigmoid map per image; features are reweighted by it."""

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.to_map = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.sigmoid(self.to_map(F.gelu(self.norm(self.depthwise(x)))))
        return x * attention, attention.squeeze(1)


class ChannelAttention(nn.Module):
    """Average- and max-pooled descriptors -> shared MLP -> sigmoid gate per channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        return x * gate[:, :, None, None]


class MultiScaleAttentionPool(nn.Module):
    """Attention pooling over 1x1, 2x2 and 4x4 grids of cells, projected to `dim`.

    Off (`enabled=False`): global average pooling and the same projection size.
    """

    def __init__(self, channels: int, dim: int, grids=(1, 2, 4), enabled: bool = True):
        super().__init__()
        self.grids = grids if enabled else ()
        # A 1x1 grid has one cell: its "attention" is always 1, so it gets no scorer.
        # Softmax ignores a shift common to all cells, so a scorer bias could never learn.
        self.scorers = nn.ModuleList([nn.Linear(channels, 1, bias=False) if g > 1 else nn.Identity()
                                      for g in self.grids])
        width = channels * len(self.grids) if enabled else channels
        self.project = nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grids:
            return self.project(x.mean(dim=(2, 3)))
        vectors = []
        for grid, scorer in zip(self.grids, self.scorers):
            cells = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)  # (B, g*g, C)
            if grid == 1:
                vectors.append(cells[:, 0])
                continue
            weights = torch.softmax(scorer(cells).float(), dim=1).to(cells.dtype)
            vectors.append((weights * cells).sum(dim=1))
        return self.project(torch.cat(vectors, dim=1))


class HierarchicalMagnificationAttention(nn.Module):
    """Each magnification attends to the lower ones present: 100X to 40X, 200X to both, ...

    The lowest magnification has nothing below it and passes through unchanged; a sample
    whose lower magnifications are all missing gets no context (not a NaN).
    """

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, m, d = z.shape
        q, k, v = self.qkv(z).view(b, m, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)).float() / (d // self.heads) ** 0.5  # (B, H, M, M)
        below = torch.ones(m, m, device=z.device, dtype=torch.bool).tril(-1)
        allowed = below[None] & (mask[:, None, :] > 0)  # key present and lower magnification
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        has_context = allowed.any(-1)[:, None, :, None]  # (B, 1, M, 1)
        weights = torch.softmax(scores.masked_fill(~has_context, 0.0), dim=-1) * has_context
        context = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, m, d)
        return self.norm(z + self.out(context))


class CrossMagnificationFusion(nn.Module):
    """Per-sample softmax importance over magnifications (learned bias per magnification plus
    a content score), masked where a magnification is missing. Off: plain mean of the present."""

    def __init__(self, dim: int, count: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        if enabled:  # no parameters at all when off: nothing that never receives a gradient
            hidden = max(1, dim // 4)
            self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False))
            self.bias = nn.Parameter(torch.zeros(count))  # learned prior per magnification

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.enabled:
            logits = self.score(z).squeeze(-1).float() + self.bias
            weights = torch.softmax(logits.masked_fill(mask <= 0, float("-inf")), dim=-1)
        else:
            weights = mask / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a sample with no image at all: all zero
        return (weights.to(z.dtype)[..., None] * z).sum(dim=1), weights
