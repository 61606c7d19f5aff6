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


# ---------------------------------------------------------------- results of the runs
LEVELS = ("patient", "tuple")
SHOWN = ("accuracy", "balanced_accuracy", "f1", "auc", "sensitivity", "specificity")


def load_results(output_dir: str | Path, experiment: str) -> list[dict]:
    import json

    paths = sorted((Path(output_dir) / "runs" / experiment).glob("fold*/results.json"))
    return [json.loads(p.read_text()) for p in paths]


def fold_table(results: list[dict]) -> pd.DataFrame:
    """One row per fold (both levels) plus a 'mean ± sd' row."""
    from utils.metrics import format_mean_sd

    rows = []
    for r in results:
        row = {"fold": r["fold"], "threshold": round(r["threshold"], 3), "best_epoch": r["best_epoch"] + 1}
        for level in LEVELS:
            row.update({f"{level}_{m}": r["metrics"][level][m] for m in SHOWN})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        summary = {c: format_mean_sd(table[c]) for c in table.columns if c not in ("fold", "best_epoch")}
        table = pd.concat([table.round(4), pd.DataFrame([{"fold": "mean ± sd", "best_epoch": "", **summary}])],
                          ignore_index=True)
    return table
