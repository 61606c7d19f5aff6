"""Tables, plots and RUNPOD_OUTPUT.md, rebuilt from output/ alone."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.tables import fold_table, load_results, markdown_table, save_table

log = logging.getLogger("mmnet")


def write_report(cfg) -> int:
    from config import EXPERIMENTS

    tables = Path(cfg.output_dir) / "tables"
    for name in EXPERIMENTS:
        results = load_results(cfg.output_dir, name)
        if results:
            table = fold_table(results)
            save_table(table, tables, f"{name}_folds")
            if name == "mmnet":
                log.info("mmnet per fold:\n%s", markdown_table(table))
    return 0
