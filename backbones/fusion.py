"""Fusion strategies for the magnification vectors of one sample, chosen by name:
create_fusion(name, dim, count) -> module(z (B, M, D), mask (B, M)) -> (fused (B, D), weights).

`weights` is (B, M), the share of each magnification in the fused vector, for the strategies
that form the vector as a weighted sum (weighted, mean, gated, attention); None for the
others (concat, cross_attention, bilinear), whose magnifications mix inside the vector. Every
strategy honours the mask: a missing magnification's vector never reaches the output.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.registry import Registry

FUSION_REGISTRY = Registry("fusion strategy", "fusion")
register_fusion, list_fusions = FUSION_REGISTRY.register, FUSION_REGISTRY.names


def create_fusion(name: str, dim: int, count: int) -> nn.Module:
    return FUSION_REGISTRY.create(name, dim, count)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where mask > 0; rows with nothing present are all zero."""
    weights = torch.softmax(scores.float().masked_fill(mask <= 0, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """Equal shares of the present slots (mask > 0), summing to 1; all zero where none is."""
    weights = (mask > 0).float()
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)


def weighted_sum(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights.to(z.dtype)[..., None] * z).sum(dim=1)


def present(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z with absent vectors set to exactly zero (multiplying would keep a NaN or inf)."""
    return z.masked_fill(mask[..., None] <= 0, 0.0)


@register_fusion("weighted")
class WeightedFusion(nn.Module):
    """Per-sample softmax importance over magnifications: a learned prior per magnification plus
    a content score of each vector (MMNet's cross-magnification fusion)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        hidden = max(1, dim // 4)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False))
        self.bias = nn.Parameter(torch.zeros(count))

    def forward(self, z, mask):
        z = present(z, mask)
        weights = masked_softmax(self.score(z).squeeze(-1).float() + self.bias, mask)
        return weighted_sum(z, weights), weights


@register_fusion("mean")
class MeanFusion(nn.Module):
    """Plain mean of the present vectors (no parameters)."""

    def __init__(self, dim: int, count: int):
        super().__init__()

    def forward(self, z, mask):
        weights = uniform_weights(mask)
        return weighted_sum(present(z, mask), weights), weights


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Concatenation (absent slots as zeros) projected back to `dim`: every magnification gets
    its own weights in the projection, so positions, not content, decide the mixing."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim * count, dim), nn.LayerNorm(dim), nn.GELU())

    def forward(self, z, mask):
        return self.project(present(z, mask).flatten(1)), None


@register_fusion("gated")
class GatedFusion(nn.Module):
    """A sigmoid gate per magnification vector (content), not competing like a softmax; the
    fused vector is the gate-weighted mean, so `weights` are the gates' shares."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.gate = nn.Linear(dim, 1)

    def forward(self, z, mask):
        z = present(z, mask)
        gates = torch.sigmoid(self.gate(z).squeeze(-1).float()) * (mask > 0)
        weights = gates / gates.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        return weighted_sum(z, weights), weights


@register_fusion("attention")
class AttentionFusion(nn.Module):
    """Attention pooling over magnification vectors with a learned query (no per-magnification
    prior: content alone decides)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, z, mask):
        z = present(z, mask)
        scores = torch.tanh(self.key(z)) @ self.query / z.shape[-1] ** 0.5
        weights = masked_softmax(scores, mask)
        return weighted_sum(z, weights), weights


@register_fusion("cross_attention")
class CrossAttentionFusion(nn.Module):
    """Each magnification attends to the others (multi-head attention over the present ones,
    residual and norm), then the mean of the present refined vectors."""

    def __init__(self, dim: int, count: int, heads: int = 4):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads if dim % heads == 0 else 1, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, z, mask):
        z = present(z, mask)
        absent = mask <= 0
        # A sample with nothing present would give NaN rows; let it attend to its zeros instead.
        keys_absent = absent & ~absent.all(dim=-1, keepdim=True)
        context, _ = self.attention(z, z, z, key_padding_mask=keys_absent, need_weights=False)
        refined = present(self.norm(z + context), mask)
        count = (mask > 0).sum(dim=-1, keepdim=True).clamp(min=1).to(z.dtype)
        return refined.sum(dim=1) / count, None


@register_fusion("bilinear")
class BilinearFusion(nn.Module):
    """Low-rank multimodal (factorised) pooling across magnifications (Liu et al., ACL 2018):
    each magnification m has its own factor W_m; [z_m, 1] W_m is multiplied elementwise over
    the present magnifications, so the pooled vector holds products of features of different
    magnifications (every subset of them, through the appended 1). A missing magnification is
    the neutral factor 1. Signed square root and normalisation, then projected back to `dim`."""

    def __init__(self, dim: int, count: int, rank: int = 0):
        super().__init__()
        rank = rank or dim
        self.factors = nn.Parameter(torch.randn(count, dim + 1, rank) * dim ** -0.5 * 0.1)
        with torch.no_grad():
            self.factors[:, -1] = 1.0  # the constant path: each factor starts near 1, so products stay O(1)
        self.project = nn.Sequential(nn.LayerNorm(rank), nn.Linear(rank, dim), nn.GELU())

    def interactions(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, rank): the product over present magnifications of their projected factors."""
        augmented = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)
        factors = torch.einsum("bmd,mdr->bmr", augmented, self.factors.to(z.dtype))
        factors = torch.where(mask[..., None] > 0, factors, torch.ones_like(factors))
        return factors.prod(dim=1)

    def forward(self, z, mask):
        product = self.interactions(z, mask)
        signed_root = torch.sign(product) * torch.sqrt(product.abs() + 1e-6)
        return self.project(signed_root), None
