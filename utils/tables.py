"""Tables from output/ CSVs as CSV, Markdown and LaTeX. Never imports torch."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


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
