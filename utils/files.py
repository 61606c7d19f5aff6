"""Plain files without torch: logging, atomic writes, CSV/Markdown tables, output file names.

Every stage uses these, the report included, so nothing here may import torch.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# Files under the output directory that the report reads back.
RUN_LOG, HEADER_FILE, DATASET_FILE = "run.log", "run_header.json", "dataset.json"
GRADCAM_DIR = "gradcam"  # one .npz of Grad-CAM maps per explained patient


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stdout and, when given, append to log_file (the raw run log)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    root.addHandler(stream)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
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
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """GitHub Markdown for a DataFrame (no tabulate dependency)."""
    frame = df.reset_index() if index else df
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def latex_table(df: pd.DataFrame) -> str:
    escape = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")
    cols = "l" + "r" * (len(df.columns) - 1)
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\hline",
             " & ".join(escape(c) for c in df.columns) + r" \\", r"\hline"]
    lines += [" & ".join(escape(_cell(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    return "\n".join(lines + [r"\hline", r"\end{tabular}"]) + "\n"


def save_table(df: pd.DataFrame, tables_dir: str | Path, name: str, latex: bool = False) -> Path:
    """Write name.csv and name.md (and name.tex) under tables_dir; returns the CSV path."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    csv = tables_dir / f"{name}.csv"
    df.to_csv(csv, index=False)
    (tables_dir / f"{name}.md").write_text(markdown_table(df))
    if latex:
        (tables_dir / f"{name}.tex").write_text(latex_table(df))
    return csv
