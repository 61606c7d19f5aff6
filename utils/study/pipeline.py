"""The steps before training: output folder, run header, data index, analysis, folds. Their
product is one preprocess.prepared.Study that the engine reads once images are attached."""
from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from pathlib import Path

import pandas as pd

from backbones import check_backbone
from backbones.hub import preflight
from config import CONFIG_FILE, Config, ConfigError, write_config_file
from preprocess.analyze import analyze
from preprocess.demo import write_demo_tree
from preprocess.prepared import Study
from preprocess.preprocess import DataError, holds_images, index_dataset, missing_data_message, write_issues
from preprocess.splits import FoldError, add_selection_roles, build_folds, kaggle_folds, load_folds, write_folds
from utils.device import EnvInfo, configure_backends, gpu_facts, versions
from utils.env import decode_workers, free_disk_gb, git_commit, runpod_hint, shm_gb
from utils.files import CHECKED_IMAGES_FILE, DATASET_FILE, HEADER_FILE, RUN_LOG, atomic_write_text, setup_logging

log = logging.getLogger("mmnet")


def prepare_output(cfg: Config, env: EnvInfo | None) -> None:
    """Create the output folder (or say why not), start logging, record the run header
    (not for --report-only: the header of the run that produced the results stays)."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output directory '{out}' is not writable ({exc.strerror}); "
                      f"pass --output-dir to a writable place") from None
    setup_logging(out / RUN_LOG)
    if env is None:
        return
    header = run_header(cfg, env)
    atomic_write_text(out / HEADER_FILE, json.dumps(header, indent=2, default=str))
    write_config_file(cfg, out / CONFIG_FILE)
    log.info("run %s | device %s (%s) | amp %s | batch %d (micro-batch %d) | workers %d | weights %s | "
             "stain normalisation %s | commit %s", header["started"], env.device, env.device_name, env.amp_dtype,
             env.batch_size, env.micro_batch, env.workers, weights_text(cfg), cfg.stain_method(), header["commit"])
    log.info("determinism: %s", header["determinism"])
    for warning in header["warnings"]:
        log.warning("%s", warning)


def run_header(cfg: Config, env: EnvInfo) -> dict:
    warnings = list(env.notes)
    disk = free_disk_gb(cfg.output_dir)
    if disk < 12:  # resnet18 at 224 px: cache 1.2 GB + fold models 8.6 GB + one last.pt per job
        warnings.append(f"only {disk} GB free under {cfg.output_dir}: the default study needs ~10 GB "
                        f"(--keep-models mmnet needs ~3 GB)")
    if hint := runpod_hint(cfg.output_dir):
        warnings.append(hint)
    return {"started": datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "env": dataclasses.asdict(env), "versions": versions(), "gpu": gpu_facts(),
            "shm_gb": round(shm_gb(), 2), "free_disk_gb": disk, "config": dataclasses.asdict(cfg),
            "determinism": configure_backends(env.device, cfg.deterministic), "warnings": warnings}


def weights_text(cfg: Config) -> str:
    """Which weights the backbones start from, as the run header says it."""
    if cfg.pretrained != "on":
        return "random init (--pretrained off)"
    return f"ImageNet from {cfg.pretrained_file}" if cfg.pretrained_file else "ImageNet (timm hub)"


def _resolve_data_dir(cfg: Config) -> tuple[Path, bool]:
    data_dir = Path(cfg.data_dir)
    if holds_images(data_dir) or not cfg.dry_run:
        return data_dir, False
    demo_dir = Path(cfg.output_dir) / "demo_data"
    if not any(demo_dir.rglob("*.png")):
        write_demo_tree(demo_dir)
    log.warning("no dataset in '%s': the dry run uses SYNTHETIC demo data from %s",
                cfg.data_dir, demo_dir)
    return demo_dir, True


def check_inputs(cfg: Config) -> None:
    """What the user typed, checked before anything slow (the device and its speed estimate):
    the backbone's name, and images where --data-dir points (a dry run falls back to demo data)."""
    if not cfg.analyze_only:
        for backbone in cfg.backbones or (cfg.backbone,):
            check_backbone(backbone)
        check_hub_access(cfg)
    if not cfg.dry_run and not holds_images(cfg.data_dir):
        raise DataError(missing_data_message(cfg.data_dir))


def check_hub_access(cfg: Config) -> None:
    """The preflight of hf-hub encoders (backbones.hub): one line each, before anything slow;
    a study stops here when one of them cannot be had."""
    answers = preflight(cfg.backbones or (cfg.backbone,), need_weights=cfg.pretrained != "off" and not cfg.pretrained_file)
    for usable, line in answers:
        if usable:  # before logging is set up: said on the console, as the refusals are
            print(f"encoder access: {line}", flush=True)
    refused = [line for usable, line in answers if not usable]
    if refused:
        raise ConfigError("\n".join(refused))


def select_patients(index: pd.DataFrame, max_patients: int, seed: int) -> pd.DataFrame:
    """A class-balanced subset of whole slide groups (never half a group)."""
    groups = index.groupby("group")["label"].first()
    keep = []
    for label in (0, 1):
        members = groups[groups == label].index.to_series().sample(frac=1.0, random_state=seed)
        chosen, patients = [], 0
        for group in members:
            if patients >= max_patients // 2:
                break
            chosen.append(group)
            patients += index.loc[index["group"] == group, "patient"].nunique()
        keep += chosen
    return index[index["group"].isin(keep)].reset_index(drop=True)


def _fold_settings(cfg: Config) -> dict:
    """What folds.csv was built from: a change of any of these rebuilds it."""
    settings = {"folds": cfg.folds, "cv_repeats": cfg.cv_repeats, "seed": cfg.seed, "inner_val_fraction": cfg.inner_val_fraction,
                "folds_source": cfg.folds_source, "stratified_on": "subtype", "grouped_by": "numeric slide id"}
    return {**settings, "select_folds": cfg.select_folds} if cfg.select else settings  # a study without --select keeps its file


def _folds(cfg: Config, index: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    path, settings_path = Path(cfg.output_dir) / "folds.csv", Path(cfg.output_dir) / "folds.json"
    settings = _fold_settings(cfg)
    saved = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    if cfg.folds_source == "kaggle":
        kaggle = data_dir / "Folds.csv"
        if not kaggle.is_file():
            raise FoldError(f"--folds-source kaggle needs {kaggle}; use --folds-source grouped")
        folds = kaggle_folds(kaggle, index, cfg.inner_val_fraction, cfg.seed)
        if cfg.select:
            folds = add_selection_roles(folds, cfg.select_folds, cfg.inner_val_fraction, cfg.seed)
    elif path.is_file():
        folds = load_folds(path)
        same = set(folds["patient"]) == set(index["patient"]) and saved == settings
        if same:
            log.info("folds: reusing %s (%d patients, %d folds)", path, len(folds), cfg.folds)
            return folds
        log.warning("folds: %s was built from other data or settings (%s); rebuilding it", path,
                    "no folds.json" if saved is None else
                    ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v) or "patients")
        folds = build_folds(index, cfg.folds, cfg.seed, cfg.inner_val_fraction, cfg.cv_repeats,
                            cfg.select_folds if cfg.select else 0)
    else:
        folds = build_folds(index, cfg.folds, cfg.seed, cfg.inner_val_fraction, cfg.cv_repeats,
                            cfg.select_folds if cfg.select else 0)
    write_folds(folds, cfg.output_dir)
    atomic_write_text(settings_path, json.dumps(settings, indent=2))
    summary = folds.groupby("fold").agg(patients=("patient", "size"), malignant=("label", "sum"),
                                        groups=("group", "nunique"))
    log.info("folds written to %s, no slide group on two sides:\n%s", path, summary.to_string())
    return folds


def prepare_data(cfg: Config) -> Study:
    """Index + validate, write data issues and the analysis, then load or build the folds."""
    data_dir, demo = _resolve_data_dir(cfg)
    index, issues = index_dataset(data_dir, workers=decode_workers(cfg.workers)[0],
                                  checked=cfg.resolved_cache_dir() / CHECKED_IMAGES_FILE)
    write_issues(issues, cfg.output_dir)
    if cfg.max_patients and index["patient"].nunique() > cfg.max_patients:
        index = select_patients(index, cfg.max_patients, cfg.seed)
        log.info("subset: %d patients, %d images (--max-patients %d)", index["patient"].nunique(),
                 len(index), cfg.max_patients)
    if index.empty:
        raise DataError(missing_data_message(data_dir))
    log.info("index: %d usable images, %d patients, %d slide groups, %d issue(s) -> %s",
             len(index), index["patient"].nunique(), index["group"].nunique(), len(issues),
             Path(cfg.output_dir) / "tables" / "data_issues.csv")
    analyze(index, data_dir, cfg.output_dir)
    summary = {"data_dir": str(data_dir), "demo": demo, "images": len(index),
               "patients": int(index["patient"].nunique()), "issues": len(issues)}
    atomic_write_text(Path(cfg.output_dir) / DATASET_FILE, json.dumps(summary, indent=2))
    folds = _folds(cfg, index, data_dir)
    return Study(index=index, folds=folds, data_dir=data_dir, demo=demo, magnifications=cfg.magnifications)
