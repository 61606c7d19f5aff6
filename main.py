"""MMNet on BreakHis, one pass: analyse -> folds -> train every experiment x fold -> report.

    python main.py                  # the whole study on data/breakhis
    python main.py --dry-run        # tiny end-to-end run (real subset or demo data)
    python main.py --analyze-only   # index, validate, analyse, folds; then stop
    python main.py --report-only    # rebuild tables, plots and RUNPOD_OUTPUT.md from output/
"""
from __future__ import annotations

import logging
import sys

from backbones import check_backbone
from config import ConfigError, parse_args
from preprocess.preprocess import DataError
from preprocess.splits import FoldError
from utils.device import DeviceError
from utils.helpers import StopRequested
from utils.inference import write_gradcam_maps
from utils.pipeline import prepare_data, prepare_output
from utils.report import write_report
from utils.study import run_study

log = logging.getLogger("mmnet")


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except (ConfigError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def run(cfg) -> int:
    try:
        prepare_output(cfg)                                   # output folder, log, run header
        if cfg.report_only:
            return write_report(cfg)
        if not cfg.analyze_only:
            check_backbone(cfg.backbone)                      # fail now, not after the analysis
        prepared = prepare_data(cfg)                          # index, issues, analysis, folds
        if cfg.analyze_only:
            log.info("--analyze-only: stopping after analysis and folds")
            return 0
        study, failed = run_study(cfg, prepared)              # every experiment x fold
        if "mmnet" in (cfg.experiments or ("mmnet",)) and cfg.gradcam_patients:
            write_gradcam_maps(cfg, study)                    # maps of chosen test patients
        code = write_report(cfg)                              # tables, plots, RUNPOD_OUTPUT.md
        return 1 if failed else code
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
