"""MMNet on BreakHis, one pass: analyse -> folds -> train every experiment x fold -> report.

    python main.py                  # the whole study on data/breakhis
    python main.py --dry-run        # tiny end-to-end run (real subset or demo data)
    python main.py --analyze-only   # index, validate, analyse, folds; then stop
    python main.py --report-only    # rebuild tables, plots and RUNPOD_OUTPUT.md from output/
"""
from __future__ import annotations

import logging
import sys

from config import ConfigError, parse_args

log = logging.getLogger("mmnet")


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        return run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def run(cfg) -> int:
    from utils.pipeline import prepare_data, prepare_output
    from utils.report import write_report
    from utils.study import run_study
    from preprocess.preprocess import DataError
    from preprocess.splits import FoldError
    from utils.helpers import StopRequested

    try:
        prepare_output(cfg)
        if cfg.report_only:
            return write_report(cfg)
        if not cfg.analyze_only:
            from backbones import check_backbone
            check_backbone(cfg.backbone)
        data = prepare_data(cfg)
        if cfg.analyze_only:
            log.info("--analyze-only: stopping after analysis and folds")
            return 0
        return run_study(cfg, data)
    except StopRequested as exc:
        log.warning("stopped on request after %s; state saved. Rerun the same command to resume.", exc)
        return 0
    except (DataError, FoldError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if logging.getLogger().handlers:  # also into run.log, once logging is set up
            log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
