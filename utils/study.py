"""Every experiment x fold on one cache and one set of folds, then the report."""
from __future__ import annotations

import hashlib
import logging
import time


from pathlib import Path

from config import EXPERIMENTS, ConfigError, detect_env, experiment_config
from utils.parallel import default_jobs, run_jobs
from utils.pipeline import RUN_LOG
from utils.train import ForeignRunError, TrainingError, run_fold

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


def sample_slots(cfg) -> int:
    """Images per training sample: 1 for image-level models, M for tuple models."""
    return 1 if cfg.model == "single" else len(cfg.magnifications)


def experiment_seconds(cfg, train_samples: int, eval_samples: int, rates: dict) -> float:
    """Time of all folds at the full epoch budget, from MMNet's measured tuple rates.

    A sample of s images costs about s/4 of a 4-magnification tuple.
    """
    cost = sample_slots(cfg) / 4
    per_epoch = (train_samples * cost / rates["train"] + eval_samples * cost / rates["eval"]
                 + rates.get("checkpoint_s", 0.0))
    return cfg.folds * (cfg.epochs * per_epoch + rates.get("setup_s", 0.0))


def measure_rates(cfg, env, study, source, usable) -> dict:
    """MMNet train and eval tuples/s on this device, from a few real batches of fold 0, plus
    the per-fold model build and the loop's share of each checkpoint."""
    from preprocess.dataset import evaluation_tuples, fold_split
    from utils.benchmark import time_train_and_eval
    from utils.helpers import snapshot
    from utils.train import checkpoint_payload, new_fold_state

    mm = experiment_config(cfg, "mmnet")
    split = fold_split(study.index, usable, study.folds, 0, mm)
    new_fold_state(mm, env, steps_per_epoch=3, seed=cfg.seed)  # first build pays one-off imports
    started = time.perf_counter()
    state = new_fold_state(mm, env, steps_per_epoch=3, seed=cfg.seed)
    rates = {"setup_s": time.perf_counter() - started}
    val_tuples, _ = evaluation_tuples(split["val"])
    rates.update(time_train_and_eval(state, mm, env, source, split["train"], env.batch_size * 2,
                                     val_tuples[:env.batch_size * 4]))
    started = time.perf_counter()  # the loop's share of a checkpoint: the CPU snapshot;
    snapshot(checkpoint_payload(state, {}))  # the disk write runs in the background
    rates["checkpoint_s"] = time.perf_counter() - started
    return rates


def predict_duration(cfg, env, study, source, usable, names: list[str]) -> float:
    """Predicted seconds for the selected experiments at their full epoch budget."""
    from preprocess.dataset import evaluation_tuples, fold_split, tuples_per_epoch

    rates = measure_rates(cfg, env, study, source, usable)
    total = 0.0
    for name in names:
        exp = experiment_config(cfg, name)
        split = fold_split(study.index, usable, study.folds, 0, exp)
        train = tuples_per_epoch(split["train"], exp.tuples_per_epoch)
        evals = len(evaluation_tuples(split["val"])[0]) + len(evaluation_tuples(split["test"])[0]) / exp.epochs
        total += experiment_seconds(exp, train, int(evals), rates)
    log.info("predicted duration: %.1f min for %d experiment(s) x %d folds x up to %d epochs "
             "(measured %.1f train / %.1f eval tuples/s; early stopping can only shorten it)",
             total / 60, len(names), cfg.folds, cfg.epochs, rates["train"], rates["eval"])
    return total


def run_experiment(cfg, env, study, source, usable, name: str, folds_hash: str) -> list[dict]:
    from utils.helpers import StopRequested, stop_requested

    exp_cfg = experiment_config(cfg, name)
    results = []
    for fold in range(cfg.folds):
        if stop_requested():
            raise StopRequested(f"{stop_requested()} before {name} fold {fold}")
        try:
            results.append(run_fold(exp_cfg, env, study, source, name, fold, usable, folds_hash))
        except ForeignRunError as exc:  # a whole-study decision, not one fold's failure
            raise ConfigError(str(exc)) from None
        except TrainingError as exc:  # one bad fold must not cost the rest of the study
            log.error("%s fold %d FAILED: %s", name, fold, exc)
    return results


def run_sequential(cfg, env, study, source, usable, names: list[str], folds_hash: str) -> int:
    """Experiments one after the other in this process; returns the number of failed folds."""
    failed = 0
    for name in names:
        started = time.perf_counter()
        results = run_experiment(cfg, env, study, source, usable, name, folds_hash)
        failed += cfg.folds - len(results)
        log.info("experiment %s: %d/%d folds in %.1f s", name, len(results), cfg.folds, time.perf_counter() - started)
    return failed


def run_study(cfg, study) -> int:
    from utils.helpers import install_stop_handlers
    from utils.report import write_report

    install_stop_handlers()  # from here on SIGTERM/SIGINT stop after the current step, saved
    env = detect_env(cfg.device, cfg.batch_size, cfg.workers)
    source, usable = load_images(cfg, env, study)
    folds_hash = folds_fingerprint(study.folds)
    names = selected_experiments(cfg)
    jobs = cfg.jobs or default_jobs(env.device)
    predicted = predict_duration(cfg, env, study, source, usable, names)
    started = time.perf_counter()
    if jobs > 1:
        log.info("running %d experiment x fold jobs on %d parallel workers (about %.1f min)",
                 len(names) * cfg.folds, jobs, predicted / 60 / jobs)
        failed = run_jobs(cfg, study, names, folds_hash, jobs, str(Path(cfg.output_dir) / RUN_LOG))
    else:
        failed = run_sequential(cfg, env, study, source, usable, names, folds_hash)
    log.info("study: %d experiment(s) x %d folds in %.1f s", len(names), cfg.folds, time.perf_counter() - started)
    if "mmnet" in names and cfg.gradcam_patients:
        from utils.inference import write_gradcam_figures
        write_gradcam_figures(cfg, study, source, usable)
    code = write_report(cfg)
    return 1 if failed else code
