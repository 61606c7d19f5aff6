"""Plots from output/ results (never imports torch). Each function writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd



def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _patients(run: dict) -> pd.DataFrame:
    return (run["pooled"].groupby(["fold", "patient"])
            .agg(label=("label", "first"), prob=("prob", "mean"), threshold=("threshold", "first"))
            .reset_index())


def confusion_matrices(runs: dict, path: Path) -> Path:
    """Pooled patient-level confusion matrix of every experiment (each fold's own threshold)."""
    plt = _plt()
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3 * rows), squeeze=False)
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
        ax.set(title=name, xlabel="predicted", ylabel="true")
    return _save(fig, path)


def roc_curves(run: dict, name: str, path: Path) -> Path:
    """Per-fold ROC curves, their mean and a ±1 sd band, at tuple and patient level."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    grid = np.linspace(0, 1, 101)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
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
        ax.set(title=f"{name}: ROC per fold ({level} level)", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def training_curves(run: dict, name: str, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for result, history in zip(run["results"], run["histories"]):
        epochs = history["epoch"] + 1
        axes[0].plot(epochs, history["train_loss"], label=f"fold {result['fold']} train")
        axes[0].plot(epochs, history["val_loss"], ls="--", label=f"fold {result['fold']} val")
        axes[1].plot(epochs, history["val_auc"], marker="o", ms=3, label=f"fold {result['fold']}")
    axes[0].set(title=f"{name}: loss", xlabel="epoch", ylabel="loss")
    axes[1].set(title=f"{name}: inner-validation AUC (tuples)", xlabel="epoch", ylabel="AUC")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, path)


def experiment_bars(stats: pd.DataFrame, path: Path, level: str = "patient") -> Path:
    """Pooled balanced accuracy and AUC of every experiment with 95 % bootstrap CIs."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("balanced_accuracy", "auc")):
        part = stats[(stats["level"] == level) & (stats["metric"] == metric)]
        x = np.arange(len(part))
        err = np.vstack([part["pooled"] - part["ci_low"], part["ci_high"] - part["pooled"]])
        colours = ["#c0504d" if e == "mmnet" else "#4f81bd" for e in part["experiment"]]
        ax.bar(x, part["pooled"], yerr=np.nan_to_num(err), capsize=3, color=colours)
        ax.set_xticks(x, part["experiment"], rotation=60, ha="right", fontsize=8)
        ax.set(title=f"{metric.replace('_', ' ')} ({level} level, 95 % CI)", ylim=(0, 1.05))
    return _save(fig, path)


def magnification_importance_plot(table: pd.DataFrame, name: str, path: Path) -> Path:
    plt = _plt()
    folds = table[table["fold"] != "mean ± sd"]
    cols = [c for c in folds.columns if c.startswith("w_")]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(folds))
    for i, (_, row) in enumerate(folds.iterrows()):
        ax.bar(np.arange(len(cols)) + i * width, row[cols].astype(float), width, label=f"fold {row['fold']}")
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, [c.removeprefix("w_").upper() for c in cols])
    ax.set(title=f"{name}: magnification importance (mean fusion weight)", ylabel="weight")
    ax.legend(fontsize=7)
    return _save(fig, path)


def calibration_plot(run: dict, name: str, path: Path, bins: int = 10) -> Path:
    """Reliability curve of pooled out-of-fold tuple probabilities."""
    from sklearn.calibration import calibration_curve

    plt = _plt()
    pooled = run["pooled"]
    observed, predicted = calibration_curve(pooled["label"], pooled["prob"], n_bins=bins, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey")
    ax.plot(predicted, observed, marker="o")
    ax.set(title=f"{name}: calibration (tuples)", xlabel="predicted malignant probability",
           ylabel="observed malignant fraction", xlim=(0, 1), ylim=(0, 1))
    return _save(fig, path)
