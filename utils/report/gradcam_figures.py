"""Grad-CAM and spatial-attention figures of explained patients (the .npz maps the inference
stage saves under output/gradcam/, or an explanation predict.py has just made). No torch."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from utils.files import new_figure, save_figure

HEAT_MAP = "inferno"  # perceptually uniform: equal steps of the map look like equal steps


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.5) -> np.ndarray:
    """uint8 RGB image with a [0, 1] map blended over it in HEAT_MAP colours."""
    colour = matplotlib.colormaps[HEAT_MAP](np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - strength) * image / 255.0 + strength * colour, 0, 1)


def _flat(values: np.ndarray) -> bool:
    return float(values.max() - values.min()) < 1e-3


def _map_row(axes, row: int, maps, images, present, kind: str) -> None:
    """One row of [0, 1] maps on a fixed scale (never stretched to its own range), with a note
    under a map that is flat (all zero: the class score has no gradient there)."""
    for col, values in enumerate(maps):
        if not present[col]:
            continue
        ax = axes[row][col]
        shown = overlay(images[col], values) if kind == "Grad-CAM" else np.clip(values, 0, 1)
        ax.imshow(shown, cmap=HEAT_MAP, vmin=0, vmax=1)
        note = "flat map: no signal" if _flat(values) else f"{kind} {float(values.min()):.2f}-{float(values.max()):.2f}"
        ax.text(0.5, -0.04, note, transform=ax.transAxes, ha="center", va="top", fontsize=7)


def _row_colour_bar(fig, row_axes, scale) -> None:
    """A colour bar in the right margin, as tall as the row's panels, beside (never over) them."""
    boxes = [ax.get_position() for ax in row_axes]
    bottom, top, right = min(b.y0 for b in boxes), max(b.y1 for b in boxes), max(b.x1 for b in boxes)
    bar = fig.add_axes([right + 0.15 / fig.get_figwidth(), bottom, 0.12 / fig.get_figwidth(), top - bottom])
    fig.colorbar(scale, cax=bar)


def patient_figure(explanation, path: Path) -> Path:
    """Columns: input slots (labels such as '40X'); rows: image, Grad-CAM over the image,
    spatial attention. Both maps on the same fixed 0-1 scale, with a colour bar per row.
    `explanation`: what utils.engine.inference.explain_tuple returns (or its saved .npz)."""
    images, present, cams = explanation["images"], explanation["present"], explanation["cams"]
    attention = explanation["attention"] if "attention" in explanation else None
    labels = [str(label) for label in explanation["labels"]]
    rows = 3 if attention is not None else 2
    fig, axes = new_figure(rows, len(labels), figsize=(2.8 * len(labels) + 0.8, 2.7 * rows + 0.7), squeeze=False,
                        constrained=False)  # the colour bars and the title are placed by hand below
    for col, label in enumerate(labels):
        for row in range(rows):
            axes[row][col].axis("off")
        axes[0][col].set_title(label if present[col] else f"{label} (missing)")
        if present[col]:
            axes[0][col].imshow(images[col])
        else:  # a pale panel of the frame's shape, said in words: never a black frame read as tissue
            axes[0][col].imshow(np.full(np.shape(images[col]), 235, dtype=np.uint8))
            axes[0][col].text(0.5, 0.5, f"no {label} image\nfor this patient", transform=axes[0][col].transAxes,
                              ha="center", va="center", fontsize=8, color="0.35")
    _map_row(axes, 1, cams, images, present, "Grad-CAM")
    if attention is not None:
        _map_row(axes, 2, attention, images, present, "attention")
    # grad-cam scales each map to its own range: colours compare places within a panel, not the
    # evidence of one magnification against another (the fusion weights and masking do that).
    names = ["image", "Grad-CAM of the predicted\nclass (each map scaled\nto its own range)", "spatial attention (0-1)"]
    for row, row_name in enumerate(names[:rows]):
        axes[row][0].text(-0.08, 0.5, row_name, transform=axes[row][0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=8)
    # Wrapped to the figure's width (about 11 characters of 9-pt text an inch): a narrow figure
    # (one or two magnifications) must not cut its title off at both edges.
    width = max(30, int(11 * fig.get_figwidth()))
    title = "\n".join(textwrap.fill(line, width) for line in str(explanation["title"]).splitlines())
    fig.suptitle(title, fontsize=9)
    # The grid is placed first, the colour bars after it: a bar made before subplots_adjust keeps
    # its old place and lies over the last panel of its row.
    fig.subplots_adjust(top=1 - (0.72 + 0.17 * (title.count("\n") + 1)) / fig.get_figheight(),  # inches: lines + slot titles
                        right=1 - 0.75 / fig.get_figwidth())
    scale = ScalarMappable(norm=Normalize(0, 1), cmap=HEAT_MAP)
    for row in range(1, rows):
        _row_colour_bar(fig, axes[row], scale)
    return save_figure(fig, path, dpi=110)


def gradcam_figures(maps_dir: Path, plots_dir: Path) -> list[Path]:
    """One figure per saved .npz of Grad-CAM maps."""
    written = []
    for npz in sorted(Path(maps_dir).glob("*.npz")):
        with np.load(npz) as explanation:
            written.append(patient_figure(explanation, Path(plots_dir) / f"{npz.stem}.png"))
    return written
