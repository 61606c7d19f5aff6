"""Grad-CAM / Grad-CAM++ per magnification branch, spatial-attention maps, and the figures.

The grad-cam package wants a model with one input tensor. BranchView exposes exactly that:
the images of one magnification go in, the other magnifications of the tuple stay fixed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("mmnet")
METHODS = ("gradcam", "gradcam++")


def branch_backbone(model: nn.Module, slot: int) -> nn.Module:
    """The timm backbone that sees slot `slot` of the input (MMNet, concat or single)."""
    if hasattr(model, "branches"):
        return model.branches[slot].backbone
    if hasattr(model, "backbones"):
        return model.backbones[slot]
    return model.backbone


def target_layer(backbone: nn.Module) -> nn.Module:
    """The last feature stage of a timm backbone: the finest map that still sees the class."""
    return backbone.get_submodule(backbone.feature_info[-1]["module"])


class BranchView(nn.Module):
    """One-tensor forward for the branch being explained; the rest of the tuple held fixed."""

    def __init__(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, slot: int):
        super().__init__()
        self.model, self.slot = model, slot
        self.register_buffer("context", x.detach())  # (1, M, 3, H, W)
        self.register_buffer("mask", mask.detach())  # (1, M)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.context.expand(images.shape[0], *self.context.shape[1:]).clone()
        x[:, self.slot] = images
        out = self.model(x, self.mask.expand(images.shape[0], -1))
        return out.logits[:, None]  # (N, 1): the malignant logit


def cam_maps(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, method: str = "gradcam",
             target: int = 1) -> np.ndarray:
    """(M, H, W) maps in [0, 1] at input size, one per present magnification (zeros if absent).

    target 1 explains 'malignant', 0 explains 'benign'. Runs in fp32; hooks are released.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
    model = model.float().eval()
    slots, height, width = x.shape[1], x.shape[-2], x.shape[-1]
    maps = np.zeros((slots, height, width), dtype=np.float32)
    for slot in range(slots):
        if mask[0, slot] <= 0:
            continue
        view = BranchView(model, x.float(), mask.float(), slot)
        with cam_class(model=view, target_layers=[target_layer(branch_backbone(model, slot))]) as cam:
            grayscale = cam(input_tensor=x[:, slot].float().clone(), targets=[BinaryClassifierOutputTarget(target)])
        maps[slot] = np.clip(grayscale[0], 0.0, 1.0)
    return maps


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray | None, float, np.ndarray]:
    """Spatial-attention maps upsampled to input size (or None), probability, fusion weights."""
    out = model.float().eval()(x.float(), mask.float())
    prob = float(torch.sigmoid(out.logits[0]))
    weights = out.mag_weights[0].cpu().numpy()
    if out.attention_maps is None:
        return None, prob, weights
    maps = F.interpolate(out.attention_maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps[0].cpu().numpy(), prob, weights


def choose_cases(predictions, threshold: float, count: int) -> list[tuple[str, str]]:
    """(case, patient) for the most confident TP, TN, FP, FN of a fold, in that order."""
    patients = predictions.groupby("patient").agg(label=("label", "first"), prob=("prob", "mean"))
    patients["pred"] = (patients["prob"] >= threshold).astype(int)
    cases = []
    for case, label, pred, most in (("TP", 1, 1, True), ("TN", 0, 0, False), ("FP", 0, 1, True),
                                    ("FN", 1, 0, False)):
        part = patients[(patients["label"] == label) & (patients["pred"] == pred)]
        if len(part):
            cases.append((case, part["prob"].idxmax() if most else part["prob"].idxmin()))
    return cases[:count]


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """uint8 RGB image with a jet-coloured [0, 1] map blended over it."""
    import matplotlib

    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    return np.clip((1 - strength) * image / 255.0 + strength * colour, 0, 1)


def patient_figure(images: np.ndarray, present: np.ndarray, cams: np.ndarray, attention,
                   labels, title: str, path: Path) -> Path:
    """Columns: input slots (labels such as '40X'); rows: image, Grad-CAM, spatial attention."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 3 if attention is not None else 2
    fig, axes = plt.subplots(rows, len(labels), figsize=(2.6 * len(labels), 2.6 * rows + 0.6),
                             squeeze=False)
    for col, label in enumerate(labels):
        for row in range(rows):
            axes[row][col].axis("off")
        axes[0][col].set_title(label if present[col] else f"{label} (missing)")
        if not present[col]:
            continue
        axes[0][col].imshow(images[col])
        axes[1][col].imshow(overlay(images[col], cams[col]))
        if attention is not None:  # min-max scaled so structure shows; the raw range is printed
            low, high = float(attention[col].min()), float(attention[col].max())
            axes[2][col].imshow((attention[col] - low) / max(high - low, 1e-6), cmap="magma", vmin=0, vmax=1)
            axes[2][col].set_title(f"range {low:.2f}-{high:.2f}", fontsize=7)
    for row, row_name in enumerate(["image", "Grad-CAM", "spatial attention"][:rows]):
        axes[row][0].text(-0.08, 0.5, row_name, transform=axes[row][0].transAxes, rotation=90,
                          ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
