"""Plots from output/ results (never imports torch). Each function writes one PNG."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from config import EXPERIMENTS, MAGNIFICATIONS, MIL_EXPERIMENTS
from utils.metrics import patient_probabilities
from utils.report.statistics import group_draws, scored_units

# How each experiment is named in figures and tables meant for readers.
TITLES = {"mmnet": "MMNet", **{f"single_{m}x": f"Single {m}X" for m in MAGNIFICATIONS},
          "simple_concat": "Concatenation of 4 magnifications", "pooled_single": "Single CNN, all magnifications pooled",
          **{f"mmnet_no_{k}": f"MMNet without {v}" for k, v in (("spatial", "spatial attention"), (
              "channel", "channel attention"), ("hierarchical", "hierarchical attention"), (
              "fusion", "learned fusion (plain mean)"), ("msap", "multi-scale pooling"))},
          "mmnet_ce_loss": "MMNet with cross-entropy loss",
          **{name: f"MMNet, {overrides['fusion'].replace('_', ' ')} fusion" for name, overrides in EXPERIMENTS.items()
             if name.startswith("mmnet_fusion_")},
          **{name: f"MIL, {name.removeprefix('mil_').replace('_', ' ')} pooling" for name in MIL_EXPERIMENTS}}


def title_of(name: str) -> str:
    """A reader's name of an experiment; names without an entry are shown as they are."""
    return TITLES.get(name, name)


def _figure(rows: int = 1, cols: int = 1, figsize=(6, 4), squeeze: bool = True):
    """A figure with its own canvas: no pyplot state, no backend to choose, nothing to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _save(fig, path: Path, dpi: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _patients(run: dict) -> pd.DataFrame:
    return patient_probabilities(run["pooled"])


def confusion_matrices(runs: dict, path: Path) -> Path:
    """Pooled patient-level confusion matrix of every experiment, decisions at each fold's
    threshold (0.5: training is class-balanced)."""
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = _figure(rows, cols, figsize=(3.1 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, (name, run) in zip(axes.flat, runs.items()):
        p = _patients(run)
        pred = (p["prob"] >= p["threshold"]).astype(int)
        matrix = np.array([[((p["label"] == t) & (pred == q)).sum() for q in (0, 1)] for t in (0, 1)])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v < matrix.max() / 2 else "white")
        ax.set_xticks([0, 1], ["benign", "malignant"])
        ax.set_yticks([0, 1], ["benign", "malignant"])
        ax.set(title=title_of(name), xlabel="predicted", ylabel="true")
        ax.title.set_fontsize(8)
    fig.suptitle("Patients, pooled out-of-fold predictions, malignant when P >= 0.5", fontsize=10)
    return _save(fig, path)


def roc_curves(run: dict, name: str, path: Path) -> Path:
    """Per-fold ROC curves, their mean and a ±1 sd band, at tuple and patient level."""
    grid = np.linspace(0, 1, 101)
    fig, axes = _figure(1, 2, figsize=(10, 4.5))
    levels = {"tuple": run["pooled"],
              "patient": _patients(run)}
    for ax, (level, frame) in zip(axes, levels.items()):
        curves = []
        for fold, part in frame.groupby("fold"):
            if part["label"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(part["label"], part["prob"])
            auc = roc_auc_score(part["label"], part["prob"])
            ax.plot(fpr, tpr, lw=1, alpha=0.5, label=f"fold {fold} (AUC {auc:.3f})")
            curves.append(np.interp(grid, fpr, tpr))
        if curves:
            mean, sd = np.mean(curves, axis=0), np.std(curves, axis=0)
            ax.plot(grid, mean, color="black", lw=2, label="mean")
            ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color="grey", alpha=0.25)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(title=f"{title_of(name)}: ROC per fold ({level} level)", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def pooled_roc(runs: dict, names: list[str], path: Path, n_boot: int = 200, seed: int = 0) -> Path:
    """The pooled out-of-fold patient ROC curve of each compared model over the same tests as the
    table's AUC (a patient once per repeat, so the legend's AUC is the table's), with a 95 % band
    from the same slide-group bootstrap as the intervals (groups resampled within class), and
    the patients, each counted once, in the legend."""
    grid = np.linspace(0, 1, 101)
    fig, ax = _figure(figsize=(6.4, 5.2))
    for name in names:
        units = scored_units(runs[name]["pooled"], "patient")
        patients = units.groupby("patient")["label"].first()
        if units["label"].nunique() < 2:
            continue
        y, p = units["label"].to_numpy(), units["prob"].to_numpy()
        groups = units.groupby("group")["label"].first()
        draws = group_draws(groups, n_boot, seed)[:, groups.index.get_indexer(units["group"])]
        band = [np.interp(grid, *roc_curve(y, p, sample_weight=w)[:2]) for w in draws
                if (w * y).sum() > 0 and (w * (1 - y)).sum() > 0]
        low, high = np.percentile(band, [2.5, 97.5], axis=0)
        fpr, tpr, _ = roc_curve(y, p)
        line, = ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc_auc_score(y, p):.3f}; {len(patients)} patients, "
                                                f"{int(patients.sum())} malignant)")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.12)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(title="Pooled out-of-fold ROC (patients), 95 % slide-group bootstrap bands",
           xlabel="1 - specificity", ylabel="sensitivity")
    ax.legend(fontsize=6.5, loc="lower right")
    return _save(fig, path)


def training_curves(run: dict, name: str, path: Path) -> Path:
    """Per fold (one colour each): the binary training loss beside the same loss on the inner-
    validation patients (when held out), the subtype loss, and the inner-validation AUC."""
    with_val = all("val_loss" in h for h in run["histories"])
    fig, axes = _figure(1, 3 if with_val else 2, figsize=(14 if with_val else 10, 4))
    for colour, (result, history) in enumerate(zip(run["results"], run["histories"])):
        epochs, style = history["epoch"] + 1, {"color": f"C{colour}"}
        # Histories written before the loss was split hold the total only: drawn as binary.
        axes[0].plot(epochs, history.get("train_binary_loss", history["train_loss"]),
                     label=f"fold {result['fold']} train", **style)
        if "train_subtype_loss" in history:
            axes[1].plot(epochs, history["train_subtype_loss"], label=f"fold {result['fold']}", **style)
        if with_val:
            axes[0].plot(epochs, history["val_loss"], ls="--", label=f"fold {result['fold']} val", **style)
            axes[2].plot(epochs, history["val_auc"], marker="o", ms=3, label=f"fold {result['fold']}", **style)
    axes[0].set(title=f"{title_of(name)}: binary loss", xlabel="epoch", ylabel="loss")
    axes[1].set(title="subtype loss (training)", xlabel="epoch", ylabel="loss")
    if with_val:
        axes[2].set(title="inner-validation AUC (image tuples)", xlabel="epoch", ylabel="AUC")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _save(fig, path)


def bar_rows(stats: pd.DataFrame, level: str, metric: str) -> pd.DataFrame:
    """One row per experiment (one in two families has a statistics row in each)."""
    part = stats[(stats["level"] == level) & (stats["metric"] == metric)]
    return part.drop_duplicates("experiment")


def experiment_bars(stats: pd.DataFrame, path: Path, level: str = "patient") -> Path:
    """Pooled balanced accuracy and AUC of every experiment with 95 % bootstrap CIs."""
    fig, axes = _figure(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("balanced_accuracy", "auc")):
        part = bar_rows(stats, level, metric)
        x = np.arange(len(part))
        err = np.vstack([part["pooled"] - part["ci_low"], part["ci_high"] - part["pooled"]])
        colours = ["#c0504d" if e == "mmnet" else "#4f81bd" for e in part["experiment"]]
        ax.bar(x, part["pooled"], yerr=np.nan_to_num(err), capsize=3, color=colours)
        ax.set_xticks(x, part["experiment"], rotation=60, ha="right", fontsize=8)
        ax.set(title=f"{metric.replace('_', ' ')} ({level} level, 95 % CI)", ylim=(0, 1.05))
    return _save(fig, path)


def magnification_importance_plot(table: pd.DataFrame, name: str, path: Path) -> Path | None:
    """Drop in patient AUC per masked magnification, one bar per fold."""
    if table.empty:
        return None
    folds = table[table["fold"] != "mean ± sd"]
    cols = [c for c in folds.columns if c != "fold"]
    fig, ax = _figure(figsize=(6, 4))
    width = 0.8 / max(1, len(folds))
    for i, (_, row) in enumerate(folds.iterrows()):
        ax.bar(np.arange(len(cols)) + i * width, row[cols].astype(float), width, label=f"fold {row['fold']}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
    ax.set(title=f"{title_of(name)}: AUC lost when one magnification is masked out", ylabel="patient AUC drop",
           xlabel="masked magnification")
    ax.legend(fontsize=7)
    return _save(fig, path)


def referral_plot(runs: dict, names: list[str], path: Path) -> Path | None:
    """Share of patients a conformal "refer" answer sends to a pathologist, against the error
    rate alpha, per compared model (utils.report.conformal, calibrated across folds)."""
    from utils.report.conformal import referral_curve

    alphas = np.linspace(0.02, 0.3, 15)
    patients = {n: _patients(runs[n]) for n in names if n in runs}
    curves = {n: referral_curve(p, alphas) for n, p in patients.items() if p["label"].nunique() == 2}
    if not curves:
        return None
    fig, ax = _figure(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(alphas, curve, marker=".", label=name)
    ax.set(title="Conformal referral rate against the error rate", xlabel="alpha (per-class error rate)",
           ylabel="share of patients referred", ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)


def calibration_plot(patients: pd.DataFrame, name: str, path: Path, bins: int = 5) -> Path:
    """Reliability of pooled patient probabilities, moved from the balanced training prior to
    each fold's training prevalence (columns label, prob, calibrated)."""
    fig, ax = _figure(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    for column, text in (("calibrated", "prior-corrected"), ("prob", "as trained (50/50 prior)")):
        observed, predicted = calibration_curve(patients["label"], patients[column], n_bins=bins, strategy="quantile")
        ax.plot(predicted, observed, marker="o", label=text)
    ax.set(title=f"{title_of(name)}: calibration (patients, pooled out-of-fold)", xlabel="predicted malignant probability",
           ylabel="observed malignant fraction", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- Grad-CAM figures
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


def patient_figure(explanation, path: Path) -> Path:
    """Columns: input slots (labels such as '40X'); rows: image, Grad-CAM over the image,
    spatial attention. Both maps on the same fixed 0-1 scale, with a colour bar per row.
    `explanation`: what utils.engine.inference.explain_tuple returns (or its saved .npz)."""
    images, present, cams = explanation["images"], explanation["present"], explanation["cams"]
    attention = explanation["attention"] if "attention" in explanation else None
    labels = [str(label) for label in explanation["labels"]]
    rows = 3 if attention is not None else 2
    fig, axes = _figure(rows, len(labels), figsize=(2.8 * len(labels) + 0.8, 2.7 * rows + 0.7), squeeze=False)
    for col, label in enumerate(labels):
        for row in range(rows):
            axes[row][col].axis("off")
        axes[0][col].set_title(label if present[col] else f"{label} (missing)")
        if present[col]:
            axes[0][col].imshow(images[col])
    _map_row(axes, 1, cams, images, present, "Grad-CAM")
    if attention is not None:
        _map_row(axes, 2, attention, images, present, "attention")
    names = ["image", "Grad-CAM of the\npredicted class (0-1)", "spatial attention (0-1)"]
    for row, row_name in enumerate(names[:rows]):
        axes[row][0].text(-0.08, 0.5, row_name, transform=axes[row][0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=8)
    scale = ScalarMappable(norm=Normalize(0, 1), cmap=HEAT_MAP)
    for row in range(1, rows):
        fig.colorbar(scale, ax=list(axes[row]), fraction=0.02, pad=0.01)
    # Wrapped to the figure's width (about 11 characters of 9-pt text an inch): a narrow figure
    # (one or two magnifications) must not cut its title off at both edges.
    width = max(30, int(11 * fig.get_figwidth()))
    title = "\n".join(textwrap.fill(line, width) for line in str(explanation["title"]).splitlines())
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(top=1 - (0.72 + 0.17 * (title.count("\n") + 1)) / fig.get_figheight())  # inches: lines + slot titles
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)  # no tight_layout: it cannot place colour bars shared by a row
    return path


def gradcam_figures(maps_dir: Path, plots_dir: Path) -> list[Path]:
    """One figure per saved .npz of Grad-CAM maps."""
    written = []
    for npz in sorted(Path(maps_dir).glob("*.npz")):
        with np.load(npz) as explanation:
            written.append(patient_figure(explanation, Path(plots_dir) / f"{npz.stem}.png"))
    return written
