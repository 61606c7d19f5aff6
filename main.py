"""MMNet on BreakHis, one pass: analyse -> folds -> train every experiment x fold -> report.

    python main.py                  # the whole study on data/breakhis
    python main.py --dry-run        # tiny end-to-end run (real subset or demo data)
    python main.py --analyze-only   # index, validate, analyse, folds; then stop
    python main.py --report-only    # rebuild tables, plots and RUNPOD_OUTPUT.md from output/
"""
from __future__ import annotations

import logging
import sys

from backbones import check_backbone, check_weights
from config import Config, ConfigError, parse_args
from preprocess.preprocess import DataError
from preprocess.splits import FoldError
from utils.benchmark import quick_study_minutes
from utils.device import DeviceError, EnvInfo, detect_env, resolved_config
from utils.env import keep_hub_cache_on_volume
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


def settle_device(cfg: Config) -> tuple[Config, EnvInfo | None]:
    """Device, AMP and weights decided once, before anything is written; a full study that
    would run on a CPU by accident, or from a silent random init, stops here."""
    if cfg.report_only:
        return cfg, None
    env = detect_env(cfg)
    cfg = resolved_config(cfg, env)
    if cfg.analyze_only:
        return cfg, env
    check_backbone(cfg.backbone)
    if env.device == "cpu" and cfg.device == "auto" and not cfg.dry_run:
        raise ConfigError(f"no CUDA GPU or Apple MPS found: the full study would take about "
                          f"{quick_study_minutes(cfg, env):.0f} min on this CPU; pass --device cpu to run it "
                          f"anyway, or --dry-run for a few-minute end-to-end check")
    keep_hub_cache_on_volume()
    log.info("backbone weights: %s", check_weights(cfg))
    return cfg, env


def run(cfg: Config) -> int:
    try:
        cfg, env = settle_device(cfg)                         # device, AMP, weights
        prepare_output(cfg, env)                              # output folder, log, run header
        if cfg.report_only:
            return write_report(cfg)
        prepared = prepare_data(cfg)                          # index, issues, analysis, folds
        if cfg.analyze_only:
            log.info("--analyze-only: stopping after analysis and folds")
            return 0
        study, failed = run_study(cfg, prepared, env)         # every experiment x fold
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
