"""Grad-CAM / Grad-CAM++ per magnification branch and spatial-attention maps (maps only:
which cases to explain is chosen with inference, figures are drawn by the report).

The grad-cam package wants a model with one input tensor. BranchView exposes exactly that:
the images of one magnification go in, the other magnifications of the tuple stay fixed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from backbones.encoder import MAP_HOOK
from backbones.grouped import branch_slices
from preprocess.dataset import reads_levels

METHODS = ("gradcam", "gradcam++")


def branch_backbone(model: nn.Module, slot: int) -> nn.Module:
    """The timm backbone that sees slot `slot` of the input (MMNet, concat or single); MMNet's
    grouped network sees every slot (branch_channels picks the slot's maps)."""
    if getattr(model, "grouped_backbone", None) is not None:
        return model.grouped_backbone
    if hasattr(model, "branches"):
        return model.branches[slot].backbone
    if hasattr(model, "backbones"):
        return model.backbones[slot]
    return model.backbone


def target_layer(backbone: nn.Module) -> nn.Module:
    """The feature map every branch pools (backbones.encoder.feature_map passes it through an
    identity hook): NCHW for CNNs and transformers alike, so no reshape is needed."""
    hook = getattr(backbone, MAP_HOOK, None)
    return hook if hook is not None else backbone.get_submodule(backbone.feature_info[-1]["module"])


def branch_channels(model: nn.Module, slot: int, slots: int):
    """Grad-CAM's reshape_transform: the slot's channels of a grouped network's maps, or None."""
    grouped = getattr(model, "grouped_backbone", None)
    if grouped is None:
        return None
    channels = branch_slices(grouped, slots)[slot]
    return lambda maps: maps[:, channels]


class BranchView(nn.Module):
    """One-tensor forward for the branch being explained; the rest of the tuple held fixed."""

    def __init__(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, slot: int):
        super().__init__()
        self.model, self.slot = model, slot
        self.register_buffer("context", x.detach())  # (1, M, 3, H, W)
        self.register_buffer("mask", mask.detach())  # (1, M)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.context.expand(images.shape[0], *self.context.shape[1:]).clone()
        x[:, self.slot] = _tracked(images)
        out = self.model(x, self.mask.expand(images.shape[0], -1))
        return out.logits[:, None]  # (N, 1): the malignant logit


class BagView(nn.Module):
    """One-tensor forward for a MIL bag: its images are the batch (so the target layer's maps
    are theirs, one per image) and every output row is the bag's logit: each image's Grad-CAM
    then explains the patient's decision, not a prediction of its own."""

    def __init__(self, model: nn.Module, codes: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("codes", codes.detach())  # (1, k) magnification codes of the images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(_tracked(images)[None], self.codes)
        return out.logits.expand(images.shape[0])[:, None]


def cam_maps(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, method: str = "gradcam",
             target: int = 1) -> np.ndarray:
    """(M, H, W) maps in [0, 1] at input size, one per present magnification (zeros if absent).

    target 1 explains 'malignant', 0 explains 'benign'. Runs in fp32; hooks are released.
    """
    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
    return _cam_maps(model.float().eval(), x, mask, cam_class, target)


def _tracked(images: torch.Tensor) -> torch.Tensor:
    """The images as a leaf that asks for gradients: the feature maps then carry gradients back
    even through a frozen encoder, whose parameters get none (no 1 B-parameter gradient)."""
    return images if images.requires_grad else images.detach().requires_grad_(True)


def _cam_maps(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, cam_class, target: int) -> np.ndarray:
    slots, height, width = x.shape[1], x.shape[-2], x.shape[-1]
    maps = np.zeros((slots, height, width), dtype=np.float32)
    if reads_levels(model):  # a MIL bag: every image in one pass
        present = mask[0] > 0
        with cam_class(model=BagView(model, mask[:, present].float()), target_layers=[target_layer(model.backbone)]) as cam:
            grayscale = cam(input_tensor=x[0, present].float().clone(),
                            targets=[BinaryClassifierOutputTarget(target)] * int(present.sum()))
        maps[present.cpu().numpy()] = np.clip(grayscale, 0.0, 1.0)
        return maps
    for slot in range(slots):
        if mask[0, slot] <= 0:
            continue
        view = BranchView(model, x.float(), mask.float(), slot)
        with cam_class(model=view, target_layers=[target_layer(branch_backbone(model, slot))],
                       reshape_transform=branch_channels(model, slot, slots)) as cam:
            grayscale = cam(input_tensor=x[:, slot].float().clone(), targets=[BinaryClassifierOutputTarget(target)])
        maps[slot] = np.clip(grayscale[0], 0.0, 1.0)
    return maps


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray | None, float, np.ndarray]:
    """Spatial-attention maps upsampled to input size (or None), probability, fusion weights."""
    out = model.float().eval()(x.float(), mask.float())
    prob = float(torch.sigmoid(out.logits[0]))
    weights = out.mag_weights[0].cpu().numpy() if out.mag_weights is not None else np.zeros(0)  # none: see fusion.py
    if out.attention_maps is None:
        return None, prob, weights
    maps = F.interpolate(out.attention_maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps[0].cpu().numpy(), prob, weights
