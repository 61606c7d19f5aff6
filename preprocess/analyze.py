"""Dataset analysis: count tables (CSV + Markdown) and plots under the output directory.

    python preprocess/analyze.py [--data-dir data/breakhis] [--output-dir output]
    python -m preprocess.analyze --data-dir D --output-dir O
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from PIL import Image

from config import MAGNIFICATIONS, SUBTYPES
from preprocess.preprocess import DataError, index_dataset, write_issues
from utils.env import decode_workers
from utils.files import BENIGN_MALIGNANT, markdown_table, new_figure, save_figure, save_table

log = logging.getLogger(__name__)


def _with_total(table: pd.DataFrame) -> pd.DataFrame:
    table = table.reindex(columns=[m for m in MAGNIFICATIONS if m in table.columns]).fillna(0).astype(int)
    table.columns = [f"{m}X" for m in table.columns]
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def analysis_tables(index: pd.DataFrame) -> dict[str, pd.DataFrame]:
    class_mag = _with_total(index.pivot_table(index="tumor_class", columns="mag", values="path",
                                              aggfunc="size"))
    subtype_order = [s for s in SUBTYPES if s in set(index["subtype"])]
    subtype_mag = _with_total(index.pivot_table(index="subtype", columns="mag", values="path",
                                                aggfunc="size").reindex(subtype_order))
    patients = (index.groupby(["tumor_class", "subtype"])
                .agg(patients=("patient", "nunique"), slide_groups=("group", "nunique"),
                     images=("path", "size")).reset_index())
    counts = index.groupby(["patient", "mag"]).size().unstack(fill_value=0)
    per_patient = pd.DataFrame({f"{m}X": counts.get(m, pd.Series(0, index=counts.index))
                                for m in MAGNIFICATIONS}).agg(["min", "median", "max"]).T.astype({"min": int, "max": int})
    return {
        "class_by_magnification": class_mag.rename_axis("class").reset_index(),
        "subtype_by_magnification": subtype_mag.rename_axis("subtype").reset_index(),
        "patients_per_subtype": patients,
        "images_per_patient_magnification": per_patient.rename_axis("magnification").reset_index(),
    }


def patient_mag_counts(index: pd.DataFrame) -> pd.DataFrame:
    counts = index.groupby(["patient", "mag"]).size().unstack(fill_value=0)
    return counts.reindex(columns=list(MAGNIFICATIONS), fill_value=0)


def _plot_bars(index: pd.DataFrame, plots: Path) -> None:
    classes = sorted(set(index["tumor_class"]))
    palette = dict(zip(("benign", "malignant"), BENIGN_MALIGNANT))
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    sns.countplot(data=index, x="tumor_class", hue="tumor_class", order=classes, palette=palette, legend=False, ax=axes[0])
    axes[0].set(title="Images per class", ylabel="images", xlabel="")
    mags = [m for m in MAGNIFICATIONS if m in set(index["mag"])]
    sns.countplot(data=index.assign(magnification=index["mag"].map(lambda m: f"{m}X")), x="magnification",
                  order=[f"{m}X" for m in mags], hue="tumor_class", hue_order=classes, palette=palette, ax=axes[1])
    axes[1].set(title="Images per magnification", xlabel="magnification", ylabel="images")
    axes[1].legend(title="class")
    save_figure(fig, plots / "class_magnification_bars.png")

    fig, axes = new_figure(1, 2, figsize=(10, 4))
    order = [s for s in SUBTYPES if s in set(index["subtype"])]
    table = (index.groupby(["subtype"]).agg(images=("path", "size"), patients=("patient", "nunique"))
             .reindex(order).reset_index())
    table["class"] = ["benign" if SUBTYPES.index(s) < 4 else "malignant" for s in order]
    for ax, column in zip(axes, ("images", "patients")):
        sns.barplot(data=table, x="subtype", y=column, hue="class", palette=palette, dodge=False, ax=ax)
        ax.set(title=f"{column.capitalize()} per subtype", xlabel="subtype", ylabel=column)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, plots / "subtype_distribution.png")


def _plot_heatmap(index: pd.DataFrame, plots: Path) -> None:
    counts = patient_mag_counts(index).rename(columns=lambda m: f"{m}X")
    fig, ax = new_figure(figsize=(5, max(3, 0.16 * len(counts) + 1)))
    sns.heatmap(counts, cmap="viridis", annot=len(counts) <= 50, fmt="d", annot_kws={"fontsize": 6},
                cbar_kws={"label": "images"}, yticklabels=True, ax=ax)
    ax.tick_params(axis="y", labelsize=5 if len(counts) > 30 else 8)
    ax.set(title="Images per patient and magnification", xlabel="", ylabel="")
    save_figure(fig, plots / "patient_magnification_heatmap.png")


def _plot_sample_grid(index: pd.DataFrame, data_dir: Path, plots: Path) -> None:
    subtypes = [s for s in SUBTYPES if s in set(index["subtype"])]
    mags = [m for m in MAGNIFICATIONS if m in set(index["mag"])]  # a 200X-only tree: one column
    fig, axes = new_figure(len(subtypes), len(mags), figsize=(2 * len(mags), 1.6 * len(subtypes) + 0.5), squeeze=False)
    for r, subtype in enumerate(subtypes):
        for c, mag in enumerate(mags):
            ax = axes[r][c]
            ax.axis("off")
            rows = index[(index["subtype"] == subtype) & (index["mag"] == mag)]
            if len(rows):
                with Image.open(data_dir / rows.iloc[0]["path"]) as img:
                    img.thumbnail((280, 184))
                    ax.imshow(np.asarray(img.convert("RGB")))
            if r == 0:
                ax.set_title(f"{mag}X")
            if c == 0:
                ax.text(-0.05, 0.5, subtype, transform=ax.transAxes, ha="right", va="center")
    save_figure(fig, plots / "sample_grid.png", dpi=110)


def analyze(index: pd.DataFrame, data_dir: str | Path, output_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Write the analysis tables and plots; return the tables."""
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    tables = analysis_tables(index)
    for name, table in tables.items():
        save_table(table, output_dir / "tables", name)
    _plot_bars(index, plots)
    _plot_heatmap(index, plots)
    _plot_sample_grid(index, Path(data_dir), plots)
    log.info("analysis: %d images, %d patients, %d slide groups -> %s", len(index),
             index["patient"].nunique(), index["group"].nunique(), output_dir)
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Analyse a BreakHis tree.")
    parser.add_argument("--data-dir", default="data/breakhis")
    parser.add_argument("--output-dir", default="output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index, issues = index_dataset(args.data_dir, workers=decode_workers()[0])
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_issues(issues, args.output_dir)
    for name, table in analyze(index, args.data_dir, args.output_dir).items():
        print(f"\n## {name}\n\n{markdown_table(table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
