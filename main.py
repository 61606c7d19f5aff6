"""MMNet on BreakHis, one pass: analyse -> folds -> train every experiment x fold -> report.

    python main.py                  # the whole study on data/breakhis
    python main.py --dry-run        # tiny end-to-end run (real subset or demo data)
    python main.py --analyze-only   # index, validate, analyse, folds; then stop
    python main.py --report-only    # rebuild tables, plots and RUNPOD_OUTPUT.md from output/
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from config import CONFIG_FILE, MIL_EXPERIMENTS, Config, ConfigError, parse_args, write_config_file
from utils.files import REPORT_LOG, setup_logging
from utils.report.build import write_report
from utils.report.html_report import LiveReport

log = logging.getLogger("mmnet")


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.backbones:
            return run_encoders(cfg)
        return rebuild_report(cfg) if cfg.report_only else run(cfg)
    except ConfigError as exc:  # one line per problem
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def rebuild_report(cfg: Config) -> int:
    """--report-only reads output/ and nothing else: no device, no torch."""
    out = Path(cfg.output_dir)
    if not out.is_dir():
        print(f"error: no output folder '{out}': run `python main.py` first", file=sys.stderr)
        return 2
    setup_logging(out / REPORT_LOG, append=False)  # run.log stays the run's own: the report shows it
    return write_report(cfg)


def run(cfg: Config) -> int:
    # The training stack (torch, timm, models) is imported here, not at the top: --report-only
    # does not need it, and importing it costs ~3-6 s of start-up on a 2-core machine.
    from preprocess.preprocess import DataError
    from preprocess.splits import FoldError
    from utils.device import DeviceError
    from utils.engine.inference import write_gradcam_maps
    from utils.engine.stop import StopRequested
    from utils.study.pipeline import check_inputs, prepare_data, prepare_output
    from utils.study.runner import run_study

    try:
        check_inputs(cfg)                                     # the data folder holds images
        cfg, env = settle_device(cfg)                         # device, AMP, weights
        prepare_output(cfg, env)                              # output folder, log, run header
        prepared = prepare_data(cfg)                          # index, issues, analysis, folds
        if cfg.analyze_only:
            log.info("--analyze-only: stopping after analysis and folds")
            return 0
        live = LiveReport(cfg.output_dir, cfg.live_report)    # report.html, rewritten after folds (at most once a minute)
        live.refresh()
        try:
            study, failed = run_study(cfg, prepared, env, live.refresh)  # every experiment x fold
        finally:
            live.wait()
        for name in explained_experiments(cfg):
            write_gradcam_maps(cfg, study, name)              # maps of chosen test patients
        code = write_report(cfg)                              # tables, plots, RUNPOD_OUTPUT.md, report.html
        return 1 if failed else code
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StopRequested as exc:
        log.warning("stopped on request after %s; state saved. Rerun the same command to resume.", exc)
        return 0
    except (DataError, FoldError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if logging.getLogger().handlers:  # also into run.log, once logging is set up
            log.error("%s", exc)
        return 2


def run_encoders(cfg: Config) -> int:
    """--backbones a,b,c: the same study for each encoder under encoders/<name>/, every one on the
    first encoder's folds.csv, then tables/encoders.* and the comparison report."""
    import dataclasses
    import shutil

    from utils.files import encoder_dir
    from utils.report.encoders import write_encoder_report
    from utils.study.pipeline import check_inputs

    if not cfg.report_only:
        check_inputs(cfg)  # every encoder's name and hub access, before the first one trains
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_config_file(cfg, Path(cfg.output_dir) / CONFIG_FILE)  # --report-only reads it back
    codes, first = [], encoder_dir(cfg.output_dir, cfg.backbones[0])
    for backbone in cfg.backbones:
        folder = encoder_dir(cfg.output_dir, backbone)
        if cfg.report_only:  # each study's report from its own config.yaml
            codes.append(rebuild_report(parse_args(["--report-only", "--output-dir", str(folder)])))
            continue
        one = dataclasses.replace(cfg, backbone=backbone, backbones=(), output_dir=str(folder))
        if folder != first and (first / "folds.csv").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("folds.csv", "folds.json"):  # the same folds, whatever else changes
                shutil.copy2(first / name, folder / name)
            if cfg.dry_run and (first / "demo_data").is_dir():  # and the same demo patients
                one = dataclasses.replace(one, data_dir=str(first / "demo_data"))
        codes.append(run(one))
    print(f"encoders: {write_encoder_report(cfg)}", flush=True)
    return max(codes)


def explained_experiments(cfg: Config) -> list[str]:
    """Grad-CAM figures: MMNet's, and each MIL model's (its patients' most-attended images)."""
    if not cfg.gradcam_patients:
        return []
    return [name for name in cfg.experiments if name == "mmnet" or name in MIL_EXPERIMENTS]


def settle_device(cfg: Config):
    """Device, AMP and weights decided once, before anything is written; a full study that
    would run on a CPU by accident, or from a silent random init, stops here."""
    from backbones import check_weights
    from utils.device import detect_env, resolved_config
    from utils.env import keep_hub_cache_on_volume
    from utils.study.benchmark import quick_study_minutes

    env = detect_env(cfg)
    cfg = resolved_config(cfg, env)
    if cfg.analyze_only:
        return cfg, env
    if env.device == "cpu" and cfg.device == "auto" and not cfg.dry_run:
        raise ConfigError(f"no CUDA GPU or Apple MPS found: the full study would take about "
                          f"{quick_study_minutes(cfg, env):.0f} min on this CPU; pass --device cpu to run it "
                          f"anyway, or --dry-run for a few-minute end-to-end check")
    keep_hub_cache_on_volume()
    log.info("backbone weights: %s", check_weights(cfg))
    return cfg, env


if __name__ == "__main__":
    raise SystemExit(main())
