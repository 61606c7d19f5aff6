"""One look for every figure (the dataset analysis, the report, Grad-CAM): seaborn's theme, a
figure with its own canvas (no pyplot state, no backend to choose, nothing to close), saved so
that no title or label is cut off. No torch here: every stage may draw."""
from __future__ import annotations

from pathlib import Path

import seaborn as sns
from matplotlib.figure import Figure

THEME = {"style": "whitegrid", "context": "notebook", "palette": "colorblind", "font_scale": 0.85}
BENIGN_MALIGNANT = ("#4c9f70", "#c0504d")  # the two classes in every figure


def new_figure(rows: int = 1, cols: int = 1, figsize=(6, 4), squeeze: bool = True, constrained: bool = True):
    """(figure, axes) in the theme; constrained layout makes room for titles, labels and legends
    (a figure that places its own colour bars passes constrained=False)."""
    sns.set_theme(**THEME)  # rcParams are read when a figure is made: set before every one
    fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """PNG at path; the bounding box grows to whatever was drawn, so nothing is clipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return path
