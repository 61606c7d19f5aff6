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
        return gate_channels([self], x)


def _stacked(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (M, in, out) and biases (M, 1, out) of one Linear per branch, for baddbmm."""
    return (torch.stack([layer.weight for layer in layers]).transpose(1, 2),
            torch.stack([layer.bias for layer in layers])[:, None])


def gate_channels(attentions: list[ChannelAttention], maps: torch.Tensor) -> torch.Tensor:
    """maps (B, M*C, h, w), M branches' channels side by side -> each branch gated by its own
    ChannelAttention, every branch and both descriptors (mean, max) in one set of operators."""
    count, batch = len(attentions), maps.shape[0]
    descriptors = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))]).view(2 * batch, count, -1)
    first, bias = _stacked([a.mlp[0] for a in attentions])
    hidden = attentions[0].mlp[1](torch.baddbmm(bias, descriptors.transpose(0, 1), first))  # (M, 2B, hidden)
    second, bias = _stacked([a.mlp[2] for a in attentions])
    gate = torch.sigmoid(torch.baddbmm(bias, hidden, second).view(count, 2, batch, -1).sum(dim=1))  # (M, B, C)
    return maps * gate.transpose(0, 1).reshape(batch, -1)[:, :, None, None]


def _cells_along(size: int, grid: int, device: str) -> torch.Tensor:
    """(grid, size): row i averages the positions of adaptive_avg_pool2d's cell i along one side
    (cell i spans floor(i*n/g) to ceil((i+1)*n/g), so cells overlap where g does not divide n)."""
    position, cell = torch.arange(size, device=device), torch.arange(grid, device=device)
    start, stop = cell * size // grid, -((-(cell + 1) * size) // grid)
    inside = (position >= start[:, None]) & (position < stop[:, None])
    return inside.float() / (stop - start)[:, None].float()


@functools.lru_cache(maxsize=64)
def cell_pooling(height: int, width: int, grids: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, height*width): row k averages the positions of cell k, every grid's g*g cells stacked
    (row-major within a grid), n = sum of g^2; and (len(grids), n): 0 on each grid's own cells,
    -inf elsewhere, so one softmax over a row attends within that grid only. Built once per
    shape and device with device ops (no host data copied in), outside any inference mode: a
    training step reuses them. Works on MPS, which refuses 7x7 -> 2x2 adaptive pooling."""
    with torch.inference_mode(False):
        pooling = torch.cat([torch.kron(_cells_along(height, g, device), _cells_along(width, g, device)) for g in grids])
        owner = torch.cat([torch.full((g * g,), k, device=device) for k, g in enumerate(grids)])  # each cell's grid
        own = owner[None, :] == torch.arange(len(grids), device=device)[:, None]
        return pooling, torch.where(own, 0.0, float("-inf"))  # no boolean indexing: nothing read back to the host


def cell_means(x: torch.Tensor, grids: tuple) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C): the mean of every cell of every grid, one matrix product (a
    view of channels-last maps, no copy)."""
    b, c, h, w = x.shape
    pooling, _ = cell_pooling(h, w, tuple(grids), str(x.device))
    return pooling.to(x.dtype) @ x.permute(0, 2, 3, 1).reshape(b, h * w, c)


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
        self.register_buffer("no_score", torch.zeros(1, channels), persistent=False)  # the 1x1 grid's row
        width = channels * len(self.grids) if enabled else channels
        self.project = nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_cells([self], x)[:, 0]

    def score_rows(self) -> torch.Tensor:
        """(grids, C): each grid's scorer, zeros for the 1x1 grid."""
        return torch.cat([self.no_score if g == 1 else s.weight for g, s in zip(self.grids, self.scorers)])


def pool_cells(pools: list[MultiScaleAttentionPool], maps: torch.Tensor) -> torch.Tensor:
    """maps (B, M*C, h, w), M branches' channels side by side -> (B, M, dim), each branch pooled by
    its own MultiScaleAttentionPool, every branch and grid at once: the cells' means, each grid's
    scorer on every cell, a softmax per grid over its own cells (the others masked to -inf), each
    grid's weighted mean, concatenated grid after grid, and each branch's projection."""
    count, (batch, _, height, width) = len(pools), maps.shape
    grids = tuple(pools[0].grids)
    if not grids:
        return _project(pools, maps.mean(dim=(2, 3)).view(batch, count, -1))
    cells = cell_means(maps, grids)  # (B, n, M*C)
    cells = cells.view(batch, cells.shape[1], count, -1).transpose(1, 2)  # (B, M, n, C)
    _, outside = cell_pooling(height, width, grids, str(maps.device))
    scorers = torch.stack([pool.score_rows() for pool in pools])  # (M, grids, C)
    logits = scorers @ cells.transpose(-1, -2) + outside  # (B, M, grids, n)
    attention = torch.softmax(logits.float(), dim=-1).to(cells.dtype)
    return _project(pools, (attention @ cells).flatten(2))


def _project(pools: list[MultiScaleAttentionPool], vectors: torch.Tensor) -> torch.Tensor:
    """(B, M, width) -> (B, M, dim): each branch's Linear, LayerNorm and GELU."""
    weight, bias = _stacked([pool.project[0] for pool in pools])
    projected = torch.baddbmm(bias, vectors.transpose(0, 1), weight)  # (M, B, dim)
    norm = pools[0].project[1]
    scale = torch.stack([pool.project[1].weight for pool in pools])[:, None]
    shift = torch.stack([pool.project[1].bias for pool in pools])[:, None]
    normalised = F.layer_norm(projected, norm.normalized_shape, eps=norm.eps) * scale + shift
    return pools[0].project[2](normalised).transpose(0, 1)


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
