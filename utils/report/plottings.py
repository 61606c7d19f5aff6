"""Plots from output/ results (never imports torch). Each function writes one PNG."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from config import EXPERIMENTS, MAGNIFICATIONS, MIL_EXPERIMENTS
from utils.files import new_figure, save_figure
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


_figure, _save = new_figure, save_figure
CLASSES = ["benign", "malignant"]


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
        matrix = pd.crosstab(p["label"], pred).reindex(index=[0, 1], columns=[0, 1], fill_value=0)
        sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, square=True, ax=ax,
                    xticklabels=CLASSES, yticklabels=CLASSES)
        ax.set(title="\n".join(textwrap.wrap(title_of(name), 28)), xlabel="predicted", ylabel="true")
        ax.title.set_fontsize(8)
    fig.suptitle("Patients, pooled out-of-fold predictions, malignant when P >= 0.5", fontsize=10)
    return _save(fig, path)


def roc_curves(run: dict, name: str, path: Path) -> Path:
    """Each test fold's ROC curve drawn faint, their mean and a ±1 sd band, at tuple and patient
    level: one legend entry for the mean however many folds and repeats there are."""
    grid = np.linspace(0, 1, 101)
    fig, axes = _figure(1, 2, figsize=(10, 4.5))
    levels = {"tuple": run["pooled"],
              "patient": _patients(run)}
    for ax, (level, frame) in zip(axes, levels.items()):
        curves, aucs = [], []
        for _, part in frame.groupby(["repeat", "fold"] if "repeat" in frame else "fold"):
            if part["label"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(part["label"], part["prob"])
            aucs.append(roc_auc_score(part["label"], part["prob"]))
            ax.plot(fpr, tpr, lw=0.8, alpha=0.3, color="C0")
            curves.append(np.interp(grid, fpr, tpr))
        if curves:
            mean, sd = np.mean(curves, axis=0), np.std(curves, axis=0)
            ax.plot(grid, mean, color="black", lw=2,
                    label=f"mean of {len(curves)} test folds (AUC {np.mean(aucs):.3f} ± {np.std(aucs):.3f}); faint: each fold")
            ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color="grey", alpha=0.25)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(title=f"{title_of(name)}: ROC per test fold ({level} level)", xlabel="1 - specificity", ylabel="sensitivity")
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


def _histories(run: dict) -> pd.DataFrame:
    """Every fold's history in one long frame: epoch from 1, a job column per fold."""
    frames = []
    for result, history in zip(run["results"], run["histories"]):
        # Histories written before the loss was split hold the total only: drawn as binary.
        frame = history.assign(epoch=history["epoch"] + 1, job=result["fold"])
        frames.append(frame.assign(train_binary_loss=history.get("train_binary_loss", history["train_loss"])))
    return pd.concat(frames, ignore_index=True)


def _mean_and_folds(ax, long: pd.DataFrame, column: str, colour: str, label: str, dashes: bool = False) -> None:
    """Each fold faint, the mean over folds with a ±1 sd band: one legend entry, any fold count."""
    if column not in long or long[column].isna().all():
        return
    style = {"ls": "--"} if dashes else {}
    sns.lineplot(data=long, x="epoch", y=column, units="job", estimator=None, color=colour, alpha=0.25, lw=0.8,
                 ax=ax, legend=False, **style)
    sns.lineplot(data=long, x="epoch", y=column, errorbar="sd", color=colour, lw=2, ax=ax, label=label, **style)


def training_curves(run: dict, name: str, path: Path) -> Path:
    """Mean over folds with a ±1 sd band (each fold faint): the binary training loss beside the
    same loss on the inner-validation patients (when held out), the subtype loss, and the
    inner-validation AUC."""
    long = _histories(run)
    with_val = "val_loss" in long and long["val_loss"].notna().all()
    fig, axes = _figure(1, 3 if with_val else 2, figsize=(14 if with_val else 10, 4))
    folds = f"mean ± sd of {long['job'].nunique()} folds"
    _mean_and_folds(axes[0], long, "train_binary_loss", "C0", f"training, {folds}")
    _mean_and_folds(axes[1], long, "train_subtype_loss", "C2", f"training, {folds}")
    if with_val:
        _mean_and_folds(axes[0], long, "val_loss", "C1", f"inner validation, {folds}", dashes=True)
        _mean_and_folds(axes[2], long, "val_auc", "C1", f"inner validation, {folds}")
    axes[0].set(title=f"{title_of(name)}: binary loss", xlabel="epoch", ylabel="loss")
    axes[1].set(title="subtype loss (training)", xlabel="epoch", ylabel="loss")
    if with_val:
        axes[2].set(title="inner-validation AUC (image tuples)", xlabel="epoch", ylabel="AUC")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
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
    """Drop in patient AUC per masked magnification: the mean over test folds as a bar with its
    sd, each fold a dot."""
    if table.empty:
        return None
    folds = table[table[table.columns[0]] != "mean ± sd"]  # the summary row names itself in the first column
    cols = [c for c in folds.columns if c not in ("repeat", "fold")]
    long = folds.melt(value_vars=cols, var_name="masked", value_name="drop").astype({"drop": float})
    fig, ax = _figure(figsize=(6, 4))
    sns.barplot(data=long, x="masked", y="drop", order=cols, errorbar="sd", color="#9bbbd9", ax=ax,
                label=f"mean ± sd of {len(folds)} test folds")
    sns.stripplot(data=long, x="masked", y="drop", order=cols, color="black", size=4, jitter=0.15, ax=ax,
                  label="one test fold")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title=f"{title_of(name)}: AUC lost when one magnification is masked out", ylabel="patient AUC drop",
           xlabel="masked magnification")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # the strip plot labels each magnification's dots
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    return _save(fig, path)


def fold_metrics_plot(per_fold: pd.DataFrame, pooled: pd.DataFrame, path: Path, metric: str = "auc") -> Path | None:
    """Patient-level metric of every test fold (dots) with a box per experiment, and the pooled
    out-of-fold value (diamond) that the tables report. per_fold: per_fold_table(); pooled:
    bar_rows() of the same metric."""
    if per_fold.empty or metric not in per_fold:
        return None
    order = list(dict.fromkeys(per_fold["experiment"]))
    fig, ax = _figure(figsize=(max(5.0, 0.9 * len(order) + 2), 4.2))
    sns.boxplot(data=per_fold, x="experiment", y=metric, order=order, color="#dbe6f1", fliersize=0, ax=ax)
    sns.stripplot(data=per_fold, x="experiment", y=metric, order=order, color="black", size=3.5, jitter=0.15,
                  alpha=0.7, ax=ax)
    values = pooled.set_index("experiment")["pooled"].reindex(order)
    ax.scatter(range(len(order)), values, marker="D", s=45, color="#c0504d", zorder=5, label="pooled out-of-fold")
    ax.set_xticks(range(len(order)), [title_of(n) for n in order], rotation=40, ha="right", fontsize=8)
    ax.set(title=f"Patient {metric.upper() if metric == 'auc' else metric.replace('_', ' ')} per test fold",
           xlabel="", ylabel=metric, ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="lower left")
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
        sns.lineplot(x=predicted, y=observed, marker="o", label=text, ax=ax)
    ax.set(title=f"{title_of(name)}: calibration\n(patients, pooled out-of-fold)", xlabel="predicted malignant probability",
           ylabel="observed malignant fraction", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)
