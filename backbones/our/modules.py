"""MMNet building blocks: spatial and channel attention, multi-scale attention pooling,
hierarchical magnification attention (fusion strategies: backbones/fusion.py)."""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=64)
def cell_matrix(size: int, grids: tuple, device: str) -> torch.Tensor:
    """(sum of grids, size): row r averages the positions of one cell of one grid, the grids
    stacked; adaptive_avg_pool2d's cells (cell i spans floor(i*n/g) to ceil((i+1)*n/g), so cells
    overlap where g does not divide n). Built once per shape and device with device ops (no host
    data copied in), outside any inference mode: a training step reuses it."""
    with torch.inference_mode(False):
        position = torch.arange(size, device=device)
        rows = []
        for grid in grids:
            cell = torch.arange(grid, device=device)
            start, stop = cell * size // grid, -((-(cell + 1) * size) // grid)
            inside = (position >= start[:, None]) & (position < stop[:, None])
            rows.append(inside.float() / (stop - start)[:, None].float())
        return torch.cat(rows)


def grid_averages(x: torch.Tensor, grids: tuple) -> list[torch.Tensor]:
    """(B, C, H, W) -> one (B, C, g, g) map of cell means per grid g, adaptive_avg_pool2d's cells
    (which do not need to divide the sizes): two matrix products for every grid at once, a
    handful of operators where one slice and mean per cell made 2 g^2 (forward) and as many
    again backward; works on MPS (which refuses 7x7 -> 2x2 adaptive pooling) and its backward
    is deterministic on CUDA."""
    h, w = x.shape[-2:]
    rows, cols = cell_matrix(h, grids, str(x.device)), cell_matrix(w, grids, str(x.device))
    every = rows.to(x.dtype) @ x @ cols.to(x.dtype).T  # (B, C, sum g, sum g): each grid's block on the diagonal
    starts = [sum(grids[:k]) for k in range(len(grids))]
    return [every[..., s:s + g, s:s + g] for s, g in zip(starts, grids)]


def grid_average(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, grid, grid) cell means (grid_averages of one grid)."""
    return grid_averages(x, (grid,))[0]


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
        for grid, scorer, averages in zip(self.grids, self.scorers, grid_averages(x, tuple(self.grids))):
            cells = averages.flatten(2).transpose(1, 2)  # (B, g*g, C)
            if grid == 1:
                vectors.append(cells[:, 0])
                continue
            weights = torch.softmax(scorer(cells).float(), dim=1).to(cells.dtype)
            vectors.append((weights * cells).sum(dim=1))
        return self.project(torch.cat(vectors, dim=1))


class HierarchicalMagnificationAttention(nn.Module):
    """Progressive fusion from low to high magnification, one level at a time.

    Every level gets a learned magnification embedding. The lowest level passes through
    (plus its embedding, normalised); level m attends to the already refined levels below it
    and to its own vector: 100X chooses between 40X and itself, 200X among the refined 40X,
    100X and itself, 400X among all. Its own vector among the keys gives every level a real
    choice (with 40X as the only key, 100X's softmax weight would always be 1 and its query
    and key weights would learn nothing), and a level with nothing present below it attends
    to itself alone. So the refined 40X never sees the higher levels and the refined 100X
    never sees 200X or 400X. A missing level below is masked out as a key.
    """

    def __init__(self, dim: int, count: int, heads: int = 4):
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.embedding = nn.Parameter(torch.zeros(count, dim))
        nn.init.trunc_normal_(self.embedding, std=0.02)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def _attend(self, query: torch.Tensor, below: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, D) attends to below (B, L, D) where present (B, L) -> context (B, D) and the
        attention weights (B, H, L)."""
        b, levels, d = below.shape
        h = self.heads
        q = self.query(query).view(b, h, 1, d // h)
        k, v = self.key_value(below).view(b, levels, 2, h, d // h).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)).float().squeeze(2) / (d // h) ** 0.5  # (B, H, L)
        absent = present[:, None, :] <= 0
        anything = ~absent.all(dim=-1, keepdim=True)  # (B, 1, 1): some level below is present
        scores = scores.masked_fill(absent, float("-inf")).masked_fill(~anything, 0.0)  # no NaN rows
        weights = torch.softmax(scores, dim=-1) * anything  # nothing below: all zero
        return (weights.to(v.dtype)[:, :, None] @ v).reshape(b, d), weights

    def forward(self, z: torch.Tensor, mask: torch.Tensor, with_weights: bool = False):
        """Refined vectors (B, M, D); with_weights also the attention (B, M, M), heads averaged:
        row m is level m's weight on each level below and on itself (row 0: itself alone).
        Assembled only when asked (evaluation), so training runs no extra operators."""
        z = z + self.embedding.to(z.dtype)
        refined, rows = [self.norm(z[:, 0])], []
        for level in range(1, z.shape[1]):
            keys = torch.stack([*refined, z[:, level]], dim=1)  # the refined levels below, and itself
            present = torch.cat([mask[:, :level], torch.ones_like(mask[:, :1])], dim=1)
            context, weights = self._attend(z[:, level], keys, present)
            refined.append(self.norm(z[:, level] + self.out(context)))
            rows.append(weights)
        refined = torch.stack(refined, dim=1)
        if not with_weights:
            return refined
        matrix = z.new_zeros(z.shape[0], z.shape[1], z.shape[1], dtype=torch.float32)
        matrix[:, 0, 0].fill_(1.0)  # a scalar fill: no host tensor copied to the device
        for level, weights in enumerate(rows, start=1):
            matrix[:, level, :level + 1] = weights.float().mean(1)
        return refined, matrix
