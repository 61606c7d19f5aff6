"""Any timm encoder as a feature-map extractor: (B, 3, H, W) images -> (B, C, h, w) maps.

CNNs give NCHW maps from forward_features as they are. Vision transformers give tokens:
timm's forward_intermediates drops the class and register tokens and reshapes the patch
tokens to their grid (with the final norm), and pads a frame whose sides are not a multiple of
the patch (dynamic_img_size / dynamic_img_pad), so a rectangular 700x460-aspect frame works.
Hierarchical transformers and MambaOut-style models give NHWC maps: permuted. Every model
then looks the same to MMNet's branches, the baselines and Grad-CAM.
"""
from __future__ import annotations

import hashlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

MAP_HOOK, PAD_ATTRIBUTE, GRID_ATTRIBUTE = "feature_map_out", "pad_to_multiple", "feature_grid"
FROZEN_ATTRIBUTE = "frozen_encoder"  # set on an encoder built for --freeze-backbone


def freeze(encoder: nn.Module) -> nn.Module:
    """A frozen encoder: no gradients, and one instance wherever a model is copied (the moving
    average of the weights holds the trainable parts only), so a 1 B-parameter encoder is in
    memory once whatever copies and branches use it."""
    encoder.requires_grad_(False)
    setattr(encoder, FROZEN_ATTRIBUTE, True)
    itself = weakref.ref(encoder)  # not the encoder: a cycle would keep it alive until a gc pass
    object.__setattr__(encoder, "__deepcopy__", lambda memo: itself())
    return encoder


def frozen_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes ('branches.0.backbone.', ...) of every place a frozen encoder sits."""
    return [f"{name}." for name, module in model.named_modules(remove_duplicate=False)
            if getattr(module, FROZEN_ATTRIBUTE, False) and name]


def frozen_encoder(model: nn.Module) -> nn.Module | None:
    """The frozen encoder a model uses (one instance for every branch), or None."""
    return next((m for m in model.modules() if getattr(m, FROZEN_ATTRIBUTE, False)), None)


def fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of an encoder's weights (names, shapes, dtypes and bytes, in state-dict order):
    a kept fold model names the frozen encoder it needs by this. Computed once per instance."""
    cached = getattr(encoder, "_fingerprint", None)
    if cached is None:
        digest = hashlib.sha256()
        for name, tensor in encoder.state_dict().items():
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        cached = digest.hexdigest()[:32]
        object.__setattr__(encoder, "_fingerprint", cached)
    return cached


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
    grid = getattr(backbone, GRID_ATTRIBUTE, 0)
    if grid:  # --feature-grid: the cached maps are pooled to at most grid x grid cells; so is this
        features = F.adaptive_avg_pool2d(features, (min(grid, features.shape[-2]), min(grid, features.shape[-1])))
    return hook(features) if hook is not None else features
