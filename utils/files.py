"""Plain files and lines without torch: output file names, atomic writes, logging, progress bars,
CSV/Markdown tables.

Every stage uses these, the report included, so nothing here may import torch.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

log = logging.getLogger("mmnet")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# Files under the output directory that the report reads back.
RUN_LOG, HEADER_FILE, DATASET_FILE = "run.log", "run_header.json", "dataset.json"
REPORT_LOG = "report_only.log"  # the log of the last --report-only rebuild (run.log is left as the run wrote it)
REPORT_FILE, HTML_REPORT, PROGRESS_FILE = "RUNPOD_OUTPUT.md", "report.html", "progress.json"
GRADCAM_DIR = "gradcam"  # one .npz of Grad-CAM maps per explained patient
MODELS_DIR = "models"  # the kept fold models: models/<experiment>/fold<k>.pt
ATTENTION_FILE = "attention.csv"  # MIL models: each test image's attention, beside predictions.csv
FEATURE_CACHE_FILE = "feature_cache.json"  # --freeze-backbone: where the encoder maps are, and their size
FAILED_JOBS_FILE = "failed_jobs.json"  # --executor ray: jobs lost after their retries (the report names them)
CHECKED_IMAGES_FILE = "checked_images.json"  # in the cache folder: each image's check, by size and mtime
RAY_JOBS_FILE = "ray_jobs.json"  # --executor ray: every job's worker processes, lost workers and outcome
ENCODERS_DIR = "encoders"  # --backbones a,b,c: one study per encoder under encoders/<name>/


def encoder_dir(output_dir: str | Path, backbone: str) -> Path:
    """The output folder of one encoder's study (hf-hub:org/name -> hf-hub_org_name)."""
    return Path(output_dir) / ENCODERS_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", backbone)


def model_file(output_dir: str | Path, experiment: str, fold: int) -> Path:
    """Where a finished fold's model is kept (its run folder holds the rest of the fold)."""
    return Path(output_dir) / MODELS_DIR / experiment / f"fold{fold}.pt"


def run_folder(output_dir: str | Path, experiment: str, fold: int) -> Path:
    return Path(output_dir) / "runs" / experiment / f"fold{fold}"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO, append: bool = True,
                  only: logging.Handler | None = None) -> None:
    """Log to stdout and, when given, to log_file (appended: a resumed run keeps its history);
    with `only`, to that handler alone (a Ray worker's records go to its driver)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    stream = only or logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    root.addHandler(stream)
    if log_file and only is None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a" if append else "w", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    for noisy in ("matplotlib", "PIL", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def atomic_write_bytes(path: str | Path, write) -> Path:
    """Call write(file_object) on a temp file beside path, then os.replace: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def _cell(value) -> str:
    """Metrics (|x| < 10) with three decimals, as the "0.912 ± 0.034" cells beside them; larger
    numbers (seconds, counts) to four significant digits; tiny ones with two."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return "n/a"
        if 0 < abs(value) < 1e-3:
            return f"{value:.2g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.4g}"
    return str(value)


def _cells(column: pd.Series) -> pd.Series:
    """A column of counts held as floats (a median of image counts) reads as whole numbers."""
    values = pd.to_numeric(column, errors="coerce") if column.dtype.kind == "f" else None
    if values is not None and values.notna().all() and (values % 1 == 0).all() and (values.abs() >= 2).any():
        return values.astype("int64").astype(str)
    return column.astype(object).map(_cell)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """GitHub Markdown through tabulate (DataFrame.to_markdown): floats to 4 significant digits,
    every other cell exactly as the table holds it (no re-parsing of "0.91 [0.85, 0.95]")."""
    frame = df.reset_index() if index else df
    cells = frame.apply(_cells) if len(frame.columns) else frame
    return cells.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"


LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "≥": r"$\geq$", "≤": r"$\leq$", "→": r"$\rightarrow$"}


def latex_table(df: pd.DataFrame, caption: str, label: str, max_columns: int = 6) -> str:
    """booktabs LaTeX through pandas' Styler: text escaped, the first column repeated in every
    part, at most max_columns columns per table so that each part fits a page width."""
    caption = "".join("\\" + c if c in "&%$#_{}" else c for c in caption)  # Styler leaves captions as given
    first, rest = df.columns[:1].tolist(), df.columns[1:].tolist()
    width = max(1, max_columns - 1)
    chunks = [rest[i:i + width] for i in range(0, len(rest), width)] or [[]]
    parts = []
    for number, chunk in enumerate(chunks, 1):
        part = df[first + chunk].astype(str)
        suffix = f" (part {number} of {len(chunks)})" if len(chunks) > 1 else ""
        styler = part.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        parts.append(styler.to_latex(hrules=True, caption=caption + suffix, position="htbp",
                                     position_float="centering", column_format="l" + "r" * len(chunk),
                                     label=f"tab:{label}" + (f"-{number}" if len(chunks) > 1 else "")))
    text = "\n".join(parts)
    for symbol, command in LATEX_SYMBOLS.items():
        text = text.replace(symbol, command)
    return "% needs \\usepackage{booktabs}\n" + text


def save_table(df: pd.DataFrame, tables_dir: str | Path, name: str, latex: bool = False, caption: str = "") -> Path:
    """Write name.csv and name.md (and name.tex, booktabs) under tables_dir; returns the CSV path."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    csv = tables_dir / f"{name}.csv"
    df.to_csv(csv, index=False)
    (tables_dir / f"{name}.md").write_text(markdown_table(df))
    if latex:
        (tables_dir / f"{name}.tex").write_text(latex_table(df, caption or name.replace("_", " "), name.replace("_", "-")))
    return csv


def on_terminal() -> bool:
    return sys.stderr.isatty()


def steps(iterable, description: str, total: int | None = None):
    """tqdm over a long step on a terminal; elsewhere the iterable with a start and an end line."""
    if on_terminal():
        yield from tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)
        return
    started = time.perf_counter()
    log.info("%s: started (%s items)", description, total if total is not None else "?")
    yield from iterable
    log.info("%s: done in %.1f s", description, time.perf_counter() - started)


def duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no estimate
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ---------------------------------------------------------------- figures
# One look for every figure (the dataset analysis, the report, Grad-CAM): seaborn's theme, a
# figure with its own canvas (no pyplot state, no backend to choose, nothing to close), saved so
# that no title or label is cut off. Imported when a figure is drawn: every stage reads this module.
THEME = {"style": "whitegrid", "context": "notebook", "palette": "colorblind", "font_scale": 0.85}
BENIGN_MALIGNANT = ("#4c9f70", "#c0504d")  # the two classes in every figure


def new_figure(rows: int = 1, cols: int = 1, figsize=(6, 4), squeeze: bool = True, constrained: bool = True):
    """(figure, axes) in the theme; constrained layout makes room for titles, labels and legends
    (a figure that places its own colour bars passes constrained=False)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(**THEME)  # rcParams are read when a figure is made: set before every one
    fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """PNG at path; the bounding box grows to whatever was drawn, so nothing is clipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return path
