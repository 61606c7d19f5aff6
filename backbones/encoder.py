"""Any timm encoder as a feature-map extractor: (B, 3, H, W) images -> (B, C, h, w) maps.

CNNs give NCHW maps from forward_features as they are. Vision transformers give tokens:
timm's forward_intermediates drops the class and register tokens and reshapes the patch
tokens to their grid (with the final norm), and pads a frame whose sides are not a multiple of
the patch (dynamic_img_size / dynamic_img_pad), so a rectangular 700x460-aspect frame works.
Hierarchical transformers and MambaOut-style models give NHWC maps: permuted. Every model
then looks the same to MMNet's branches, the baselines and Grad-CAM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAP_HOOK, PAD_ATTRIBUTE = "feature_map_out", "pad_to_multiple"


def is_token_model(backbone: nn.Module) -> bool:
    """Patch-embedding models (ViT, DeiT, BEiT, EVA, Swin, ...): maps come from
    forward_intermediates, which knows their prefix tokens and grid."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "forward_intermediates")


def stride(backbone: nn.Module) -> int:
    return int(backbone.feature_info[-1]["reduction"]) if hasattr(backbone, "feature_info") else 32


def padded(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    """A frame's (height, width) rounded up to a multiple of the encoder's stride."""
    return tuple(-(-side // multiple) * multiple for side in shape)


def map_channels(backbone: nn.Module) -> int:
    """Channels of the maps feature_map() returns."""
    if is_token_model(backbone):
        return int(backbone.feature_info[-1]["num_chs"])
    return int(backbone.num_features)


def add_map_hook(backbone: nn.Module) -> nn.Module:
    """An identity module that every feature map passes through: Grad-CAM's target layer, the
    same for CNNs and transformers (it holds no weights, so state dicts do not change).
    The classifier head that timm keeps with num_classes=0 (a pre-logits layer, a final norm)
    lies after the feature map and never runs: frozen, so no optimizer slot waits on it."""
    backbone.add_module(MAP_HOOK, nn.Identity())
    for name, param in backbone.named_parameters():
        if name.startswith(("head.", "fc_norm.")):
            param.requires_grad_(False)
    return backbone


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features of images x (B, 3, H, W), whatever layout the encoder uses.
    Maps that were computed earlier (--freeze-backbone: x is already (B, C, h, w) with C the
    encoder's channels) pass straight through."""
    hook = getattr(backbone, MAP_HOOK, None)
    if x.shape[1] != 3 and x.shape[1] == map_channels(backbone):
        return hook(x) if hook is not None else x
    if is_token_model(backbone):
        pad_to = getattr(backbone, PAD_ATTRIBUTE, 0)
        if pad_to:  # fixed-size models (Swin): pad to a multiple of the stride, as built
            height, width = padded(x.shape[-2:], pad_to)
            x = F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        features = backbone.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)[-1]
    else:
        features = backbone.forward_features(x)
        if features.shape[1] != backbone.num_features and features.shape[-1] == backbone.num_features:
            features = features.permute(0, 3, 1, 2)  # NHWC -> NCHW
    return hook(features) if hook is not None else features
