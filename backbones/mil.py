"""Multiple-instance learning over a patient's images (all magnifications in one bag).

A bag is (B, K) slots of images (or cached encoder maps) with a (B, K) mask that holds, for a
present image, 1 + the position of its magnification in config.MAGNIFICATIONS (0 for an empty
slot): the model adds a learned magnification embedding to each image's vector. The encoder runs
on the present images only, so an empty slot's content can change nothing. An aggregator turns
the instance vectors into one patient vector and says how much each image counted:
create_aggregator(name, dim) -> module(h (B, K, D), present (B, K)) -> (pooled (B, D), weights (B, K)),
weights summing to 1 over the present images. Registered models: mil_<aggregator>.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones import ModelOutput, StudyModel, create_backbone, feature_map, map_channels, register
from backbones.fusion import masked_softmax, uniform_weights, weighted_sum
from backbones.registry import Registry
from config import MAGNIFICATIONS, MIL_AGGREGATORS
from preprocess.dataset import magnification_codes

AGGREGATOR_REGISTRY = Registry("MIL aggregator", "model")
register_aggregator, list_aggregators = AGGREGATOR_REGISTRY.register, AGGREGATOR_REGISTRY.names
EVAL_CHUNK = 64  # images per encoder pass when no gradient is needed (a whole patient at test time)


def create_aggregator(name: str, dim: int) -> nn.Module:
    return AGGREGATOR_REGISTRY.create(name, dim)


@register_aggregator("mean")
class MeanAggregator(nn.Module):
    def __init__(self, dim: int):
        super().__init__()

    def forward(self, h, present):
        weights = uniform_weights(present)
        return weighted_sum(h, weights), weights


@register_aggregator("max")
class MaxAggregator(nn.Module):
    """Feature-wise max over the present images; an image's weight is the share of features
    in which it is the maximum."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, h, present):
        filled = h.masked_fill(present[..., None] <= 0, float("-inf"))
        pooled, winner = filled.max(dim=1)  # (B, D)
        anything = present.sum(dim=-1, keepdim=True) > 0
        pooled = torch.where(anything, pooled, torch.zeros_like(pooled))
        # one_hot() checks its values on the host; a scatter counts the same wins on the device
        wins = torch.zeros(*winner.shape, h.shape[1], device=h.device).scatter_(-1, winner[..., None], 1.0)
        shares = wins.mean(dim=1) * anything
        return pooled, shares


@register_aggregator("attention")
class AttentionAggregator(nn.Module):
    """Ilse et al. 2018: a_k = softmax_k(w^T tanh(V h_k)), pooled = sum_k a_k h_k."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1, bias=False)

    def scores(self, h):
        return self.w(torch.tanh(self.V(h))).squeeze(-1)

    def forward(self, h, present):
        weights = masked_softmax(self.scores(h), present)
        return weighted_sum(h, weights), weights


@register_aggregator("gated_attention")
class GatedAttentionAggregator(AttentionAggregator):
    """Ilse et al. 2018, gated: a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__(dim, hidden)
        self.U = nn.Linear(dim, hidden)

    def scores(self, h):
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)


class MILNet(StudyModel):
    """One shared encoder -> pooled, projected vector per image + magnification embedding ->
    aggregator -> binary and subtype heads."""

    reads_levels = True  # the data layer puts magnification codes into the mask

    def __init__(self, backbone: nn.Module, cfg, pretrained_status: str, aggregator: str):
        super().__init__(cfg, backbone, pretrained_status)
        self.backbone = backbone
        self.project = nn.Sequential(nn.Linear(map_channels(backbone), cfg.feature_dim),
                                     nn.LayerNorm(cfg.feature_dim), nn.GELU())
        self.level_embedding = nn.Embedding(len(MAGNIFICATIONS), cfg.feature_dim)
        nn.init.trunc_normal_(self.level_embedding.weight, std=0.02)
        self.aggregator = create_aggregator(aggregator, cfg.feature_dim)
        self.levels = magnification_codes(cfg.magnifications).tolist()  # mask codes, in slot order

    def instance_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) images or (n, C, h, w) maps -> (n, D); in chunks when nothing needs a
        gradient, so a patient of a few hundred images fits in memory at test time."""
        chunk = len(images) if torch.is_grad_enabled() else EVAL_CHUNK
        parts = [feature_map(self.backbone, images[i:i + chunk].contiguous(memory_format=torch.channels_last))
                 for i in range(0, len(images), chunk)]
        return self.project(torch.cat(parts).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> ModelOutput:
        # Every slot is encoded (a static shape: no value-sized indexing, no device sync); an
        # empty slot's vector is zeroed and the aggregator gives it no weight. Training bags
        # have no empty slot (BatchNorm's batch statistics never see a black frame) and
        # evaluation drops a batch's empty columns, so this costs nothing in the loop.
        present = mask > 0
        vectors = self.instance_vectors(x.flatten(0, 1)).view(*mask.shape, -1)
        vectors = vectors + self.level_embedding((mask.long() - 1).clamp(min=0)).to(vectors.dtype)
        h = vectors * present[..., None].to(vectors.dtype)
        pooled, weights = self.aggregator(h, present.float())
        logits, subtype_logits = self.heads(pooled)
        by_level = torch.stack([(weights * (mask == level)).sum(dim=-1) for level in self.levels], dim=-1)
        return ModelOutput(logits, subtype_logits, by_level, instance_weights=weights)


def _builder(aggregator: str):
    def build(cfg) -> MILNet:
        backbone, status = create_backbone(cfg)
        return MILNet(backbone, cfg, status, aggregator)
    return build


for _name in MIL_AGGREGATORS:
    register(f"mil_{_name}")(_builder(_name))
