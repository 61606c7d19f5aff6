"""Every experiment x fold on one cache and one set of folds, then the report."""
from __future__ import annotations

import hashlib
import logging
import time

from config import EXPERIMENTS, detect_env, experiment_config
from utils.train import TrainingError, run_fold

log = logging.getLogger("mmnet")


def folds_fingerprint(folds) -> str:
    """Changes whenever any patient's fold or inner role changes."""
    cols = ["patient", "fold"] + sorted(c for c in folds.columns if c.startswith("role_f"))
    return hashlib.sha256(folds[cols].sort_values("patient").to_csv(index=False).encode()).hexdigest()[:16]


def selected_experiments(cfg) -> list[str]:
    return list(cfg.experiments) or list(EXPERIMENTS)


def load_images(cfg, env, study):
    """Decoded-image cache (built once) placed where the model runs."""
    from preprocess.dataset import ImageSource
    from preprocess.preprocess import build_cache

    cache, usable = build_cache(study.index, study.data_dir, cfg.resolved_cache_dir(),
                                cfg.image_size, env.workers)
    return ImageSource(cache, env.device), usable


def run_experiment(cfg, env, study, source, usable, name: str, folds_hash: str) -> list[dict]:
    exp_cfg = experiment_config(cfg, name)
    results = []
    for fold in range(cfg.folds):
        try:
            results.append(run_fold(exp_cfg, env, study, source, name, fold, usable, folds_hash))
        except TrainingError as exc:  # one bad fold must not cost the rest of the study
            log.error("%s fold %d FAILED: %s", name, fold, exc)
    return results


def run_study(cfg, study) -> int:
    from utils.report import write_report

    env = detect_env(cfg.device, cfg.batch_size, cfg.workers)
    source, usable = load_images(cfg, env, study)
    folds_hash = folds_fingerprint(study.folds)
    names = selected_experiments(cfg)
    failed, started = 0, time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        results = run_experiment(cfg, env, study, source, usable, name, folds_hash)
        failed += cfg.folds - len(results)
        log.info("experiment %s: %d/%d folds in %.1f s", name, len(results), cfg.folds, time.perf_counter() - t0)
    log.info("study: %d experiment(s) x %d folds in %.1f s", len(names), cfg.folds, time.perf_counter() - started)
    code = write_report(cfg)
    return 1 if failed else code
