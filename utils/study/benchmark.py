"""Throughput and latency of the real code paths, and the predicted time of a full run.

    python -m utils.benchmark --backbone resnet18 --image-size 224 [--device cuda] [--batch 64] [--freeze-backbone]

Rows (output/tables/benchmark.csv): cache build images/s; train tuples/s end to end (cache ->
gather -> device augmentation -> model -> optimizer); train tuples/s of the model alone on
device-resident tensors; their ratio (data pipeline efficiency); eval tuples/s; host syncs per
training step (0 expected); a fold's fixed seconds (build, first step, end-of-fold write);
predict.py's decoding ms per image (threads) and model ms per patient for 1 and 5 fold models
(all tuples of a 100-image patient, warm; on a CPU the 5-model figure is 5 x 1), with the 5-model
time predicted for an H100, an RTX 4090 and an A40 from the counted FLOPs (utils.study.rates:
GPU_TFLOPS at GPU_UTILISATION); peak memory; predicted full run.
With --freeze-backbone also: feature-cache build images/s, frozen train and eval tuples/s,
frozen_speedup (frozen over fine-tuning train tuples/s, same encoder, same run), the cache size
for the 7,909 images and the predicted full study in that mode.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from config import DEFAULT_EXPERIMENTS, GROUPS, Config, experiment_config
from preprocess.dataset import ImageSource, evaluation_tuples, fold_split, tuples_per_epoch
from preprocess.preprocess import frame_shape
from preprocess.stain import fold_reference
from utils.config_file import CHOICES
from utils.device import configure_backends, detect_env
from utils.engine.checkpoint import checkpoint_payload
from utils.engine.features import FeatureSource, encode_to_file
from utils.engine.fold import normalised_once
from utils.engine.graphs import GRAPH_WARMUP_STEPS, graph_blocker
from utils.engine.losses import StudyLoss
from utils.engine.optimizer import make_scheduler
from utils.engine.saving import snapshot
from utils.engine.train import LoopSettings, new_fold_state
from utils.files import markdown_table
from utils.study.rates import (
    cache_build_rate,
    decode_ms_per_image,
    fixed_seconds_per_fold,
    model_alone_rate,
    peak_memory_gb,
    pipeline_efficiency,
    predictor_latency,
    step_counts,
    synthetic_patients,
    time_train_and_eval,
)

log = logging.getLogger("mmnet")
FULL = {"images": 7909, "folds": 5}  # the default study's size


def synthetic_study(cfg: Config, env, batches: int):
    """MMNet's fold state and loop settings over 8 synthetic 100-image patients (25 images at
    each magnification) cached on the device: (state, loop, cache). With stain normalisation the
    fold's reference is fitted and training reads the normalised copy, as a fold does."""
    rows, data = synthetic_patients(n_patients=8, per_mag=25, mags=len(cfg.magnifications))
    cache = np.random.default_rng(0).integers(0, 256, (len(rows), *frame_shape(cfg.image_size), 3), dtype=np.uint8)
    source = ImageSource(cache, env.device)
    stain = fold_reference(cfg.stain_method(), source, data, seed=0)
    state = new_fold_state(cfg, env, steps_per_epoch=batches, seed=0, stain=stain)
    state.scheduler = make_scheduler(state.optimizer, 10 * batches, 0)
    state.accumulation = -(-env.batch_size // env.micro_batch)
    loop = LoopSettings(normalised_once(cfg, source, stain), data, StudyLoss(cfg, None), env.batch_size, env.amp_dtype,
                        cfg.grad_clip)
    return state, loop, cache


def graphed_rates(state, loop: LoopSettings, batches: int) -> dict:
    """On CUDA, where the step can be recorded: training tuples/s with --cuda-graphs on, timed
    after the eager warm-up steps and the capture (beside loop_rates()'s eager rate)."""
    if loop.source.device.type != "cuda" or graph_blocker("on", "cuda", loop.amp_dtype, state.accumulation):
        return {}
    graphed = dataclasses.replace(loop, graphs=True)
    eval_tuples = evaluation_tuples(loop.data)[0][:loop.batch_size]
    rate = time_train_and_eval(state, graphed, batches * loop.batch_size, eval_tuples,
                               warmup_batches=GRAPH_WARMUP_STEPS + 2)["train"]
    state.graphed = None
    return {"train_tuples_per_s_graphed": rate}


def loop_rates(state, loop: LoopSettings, batches: int) -> dict:
    """Train and eval tuples/s through the real loop: the rates every duration estimate uses
    (evaluation timed on four batches' worth of tuples: the rate, not the whole set)."""
    eval_tuples = evaluation_tuples(loop.data)[0][:4 * loop.batch_size]
    rates = time_train_and_eval(state, loop, batches * loop.batch_size, eval_tuples)
    return {"train_tuples_per_s_end_to_end": rates["train"], "eval_tuples_per_s": rates["eval"]}


def study_minutes(cfg: Config, rates: dict) -> float:
    """Minutes of the default study from loop_rates(): the one estimate behind the start-up
    check and the benchmark's predicted_full_run_minutes."""
    return predicted_full_run_s(cfg, rates) / 60


def measure(cfg: Config, env, batches: int, cache_images: int) -> dict:
    state, loop, cache = synthetic_study(cfg, env, batches)
    rates = loop_rates(state, loop, batches)
    rates.update(graphed_rates(state, loop, batches))
    efficiency = pipeline_efficiency(state, loop, lambda: model_alone_rate(state, cfg, env, batches, len(cfg.magnifications)),
                                     batches)
    predictor = predictor_latency(state.model, cfg, cache, loop.data, env.device)
    return {"cache_build_images_per_s": cache_build_rate(cache_images, env.workers, cfg.image_size) if cache_images else float("nan"),
            **rates, **efficiency,
            **step_counts(state, loop), "ops_per_step_graphed": step_counts(state, loop, graphed=True)["ops_per_step"],
            **single_image_ops(cfg, env),
            **fixed_seconds_per_fold(cfg, env, loop),
            "decode_ms_per_image": decode_ms_per_image(8, cfg.image_size, threads=8), **predictor,
            "peak_memory_gb": peak_memory_gb(env.device)}


def single_image_ops(cfg: Config, env) -> dict:
    """Dispatched operators per training step of the single-image baseline (single_200x) at
    the same size, batch and device, eager and with --cuda-graphs."""
    state, loop, _ = synthetic_study(experiment_config(cfg, "single_200x"), env, batches=1)
    return {"ops_per_step_single_image": step_counts(state, loop)["ops_per_step"],
            "ops_per_step_single_image_graphed": step_counts(state, loop, graphed=True)["ops_per_step"]}


def measure_frozen(cfg: Config, env, batches: int, fine_tune: dict) -> dict:
    """--freeze-backbone: feature-cache build images/s (all four views of each), frozen
    training and evaluation tuples/s, and the speed-up over fine-tuning the same encoder
    (fine_tune: measure()'s rates, taken in the same run)."""
    frozen = dataclasses.replace(cfg, freeze_backbone=True)
    rows, data = synthetic_patients(n_patients=4, per_mag=25, mags=len(cfg.magnifications))
    cache = np.random.default_rng(0).integers(0, 256, (len(rows), *frame_shape(cfg.image_size), 3), dtype=np.uint8)
    images = ImageSource(cache, env.device)
    state = new_fold_state(frozen, env, steps_per_epoch=batches, seed=0)
    encoder = state.model.branches[0].backbone.eval()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        encode_to_file(encoder, images, Path(folder) / "maps.npy", max(1, env.micro_batch * 4), env.amp_dtype)
        build = len(rows) / (time.perf_counter() - started)
        maps = np.load(Path(folder) / "maps.npy")
    loop = LoopSettings(FeatureSource(maps, images), data, StudyLoss(frozen, None), env.batch_size, env.amp_dtype,
                        cfg.grad_clip)
    rates = time_train_and_eval(state, loop, batches * env.batch_size * 4, evaluation_tuples(data)[0])
    speeds = {"train_tuples_per_s_end_to_end": rates["train"], "eval_tuples_per_s": rates["eval"]}
    return {"feature_cache_images_per_s": build, "frozen_train_tuples_per_s": rates["train"],
            "frozen_eval_tuples_per_s": rates["eval"],
            "frozen_speedup": rates["train"] / fine_tune["train_tuples_per_s_end_to_end"],
            "feature_cache_gb_7909_images": maps.nbytes / len(rows) * FULL["images"] / 1e9,
            "predicted_full_run_minutes_frozen": (predicted_full_run_s(frozen, speeds) + FULL["images"] / build) / 60,
            **minutes_added_by_groups(frozen, speeds, "_frozen")}


# ---------------------------------------------------------------- duration of a study
def sample_slots(cfg) -> int:
    """Images per training sample: 1 for image-level models, M for tuple models, the bag size
    for MIL models (whose evaluation samples are counted in bags' worth of images too)."""
    if cfg.sample_mode == "bag":
        return cfg.bag_size
    return 1 if cfg.model == "single" else len(cfg.magnifications)


def evaluation_samples(cfg, val_samples: int, test_samples: int, train_samples: int = 0) -> float:
    """Single-view forward passes of evaluation per epoch: the inner-validation patients every
    epoch (when an epoch is chosen), the test fold once, each times its test-time views, the
    test fold again in the plain view, whole and with each magnification masked (tuple models
    of several magnifications), and once per fold the training patients' plain view that
    settles the BatchNorm statistics."""
    views = 4 if cfg.tta == "on" else 1
    several = cfg.sample_mode == "tuple" and len(cfg.magnifications) > 1
    plain = len(cfg.magnifications) if several else 0  # the plain view itself is the first test-time view
    val = val_samples if cfg.model_selection == "inner_val" else 0
    return val + (test_samples * (views + plain) + train_samples) / cfg.epochs


def experiment_seconds(cfg, train_samples: int, eval_samples: float, rates: dict) -> float:
    """Time of all folds at the full epoch budget, from MMNet's measured tuple rates.

    A sample of s images costs about s/4 of a 4-magnification tuple.
    """
    cost = sample_slots(cfg) / 4
    per_epoch = (train_samples * cost / rates["train"] + eval_samples * cost / rates["eval"]
                 + rates.get("checkpoint_s", 0.0))
    return cfg.folds * (cfg.epochs * per_epoch + rates.get("setup_s", 0.0))


def measure_rates(cfg, study) -> dict:
    """MMNet train and eval tuples/s on this device, from a few real batches of fold 0, plus
    the per-fold model build and the loop's share of each checkpoint."""
    env, mm = study.env, experiment_config(cfg, "mmnet")
    split = fold_split(study.index, study.usable, study.folds, 0, mm)
    new_fold_state(mm, env, steps_per_epoch=3, seed=cfg.seed)  # first build pays one-off imports
    started = time.perf_counter()
    state = new_fold_state(mm, env, steps_per_epoch=3, seed=cfg.seed)
    rates = {"setup_s": time.perf_counter() - started}
    val_tuples, _ = evaluation_tuples(split["test"])
    loop = LoopSettings(study.source, split["train"], StudyLoss(mm, None), env.batch_size, env.amp_dtype, mm.grad_clip)
    rates.update(time_train_and_eval(state, loop, env.batch_size * 2, val_tuples[:env.batch_size * 4]))
    started = time.perf_counter()  # the loop's share of a checkpoint: the CPU snapshot;
    snapshot(checkpoint_payload(state, {}))  # the disk write runs in the background
    rates["checkpoint_s"] = time.perf_counter() - started
    return rates


def _evaluated(data, cfg) -> float:
    """Evaluation samples of a split in training-sample units: tuples, or images / bag size
    for MIL models (a test bag is a whole patient)."""
    if cfg.sample_mode == "bag":
        return sum(len(rows[0]) for rows in data.rows) / cfg.bag_size
    return len(evaluation_tuples(data)[0])


def predict_duration(cfg, study, jobs: list[tuple[str, int]]) -> dict[str, float]:
    """Predicted seconds of one fold of each experiment of `jobs` (experiment, fold) at its full
    epoch budget (a --select inner job counted as an outer one: a little high)."""
    names = list(dict.fromkeys(name for name, _ in jobs))
    rates = measure_rates(cfg, study)
    per_fold = {}
    for name in names:
        exp = experiment_config(cfg, name)
        split = fold_split(study.index, study.usable, study.folds, 0, exp)
        train = tuples_per_epoch(split["train"], exp)
        val = _evaluated(split["val"], exp) if "val" in split else 0
        evals = evaluation_samples(exp, val, _evaluated(split["test"], exp), _evaluated(split["train"], exp))
        per_fold[name] = experiment_seconds(exp, train, evals, rates) / exp.folds
    total = sum(per_fold[name] for name, _ in jobs)
    log.info("predicted duration: %.1f min for %d job(s) of %d experiment(s) x up to %d epochs "
             "(measured %.1f train / %.1f eval tuples/s)",
             total / 60, len(jobs), len(names), cfg.epochs, rates["train"], rates["eval"])
    return per_fold


def predicted_full_run_s(cfg: Config, rates: dict, names=()) -> float:
    """Every default experiment (or those named) x 5 folds at the full epoch budget, from the measured rates.

    Per fold 4/5 of the images are training patients (less the inner-validation share when
    an epoch is chosen on them) and 1/5 are tested.
    """
    speeds = {"train": rates["train_tuples_per_s_end_to_end"], "eval": rates["eval_tuples_per_s"]}
    outer = FULL["images"] * (1 - 1 / FULL["folds"])
    val_images = outer * cfg.inner_val_fraction if cfg.model_selection == "inner_val" else 0.0
    train_images, test_images = outer - val_images, FULL["images"] / FULL["folds"]
    total = 0.0
    for name in names or DEFAULT_EXPERIMENTS:
        exp = dataclasses.replace(experiment_config(cfg, name), folds=FULL["folds"])
        share = len(exp.magnifications) / 4 if exp.sample_mode == "tuple" else 1.0
        per_sample = sample_slots(exp)
        train = int(train_images * share / per_sample)
        evals = evaluation_samples(exp, int(val_images * share / per_sample), int(test_images * share / per_sample), train)
        total += experiment_seconds(exp, train, evals, speeds)
    return total


def minutes_added_by_groups(cfg: Config, rates: dict, suffix: str = "") -> dict[str, float]:
    """Predicted minutes each experiment group adds to a study that already has MMNet."""
    return {f"predicted_minutes_added_by_{group}{suffix}": predicted_full_run_s(
        cfg, rates, [m for m in members if m != "mmnet"]) / 60 for group, members in GROUPS.items()}


def quick_study_minutes(cfg: Config, env) -> float:
    """The start-up check's estimate of the default study on this device: the benchmark's own
    measurement (loop_rates, study_minutes), with steps of one micro-batch to keep it short."""
    mm = dataclasses.replace(experiment_config(cfg, "mmnet"), pretrained="off", pretrained_file="")
    state, loop, _ = synthetic_study(mm, dataclasses.replace(env, batch_size=env.micro_batch), 1)
    return study_minutes(cfg, loop_rates(state, loop, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=Config.batch_size, help="tuples per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=0, help="tuples per forward pass (0 = from device memory)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--batches", type=int, default=4, help="timed training batches")
    parser.add_argument("--cache-images", type=int, default=64, help="PNGs decoded for the cache rate")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--freeze-backbone", action="store_true", help="also measure the frozen-encoder mode")
    parser.add_argument("--grouped-branches", default=Config.grouped_branches, choices=CHOICES["grouped_branches"],
                        help="MMNet's encoders side by side (on) or one by one (off): compare the two on a GPU")
    args = parser.parse_args(argv)
    cfg = Config(backbone=args.backbone, image_size=args.image_size, pretrained="off", device=args.device,
                 batch_size=args.batch, micro_batch=args.micro_batch, grouped_branches=args.grouped_branches)
    env = detect_env(cfg)
    configure_backends(env.device, deterministic=False)
    rates = measure(cfg, env, args.batches, args.cache_images)
    rates["predicted_full_run_minutes"] = study_minutes(cfg, rates)
    rates.update(minutes_added_by_groups(cfg, rates))
    if args.freeze_backbone:
        rates.update(measure_frozen(cfg, env, args.batches, rates))
    table = pd.DataFrame([{"metric": k, "value": round(v, 3)} for k, v in rates.items()])
    table.insert(0, "device", env.device_name)
    table.insert(1, "setting", f"{args.backbone} {args.image_size}px batch {env.batch_size} (micro {env.micro_batch}) amp {env.amp_dtype}")
    out = Path(args.output_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "benchmark.csv", index=False)
    print(markdown_table(table))
    print(f"predicted full default run ({len(DEFAULT_EXPERIMENTS)} experiments x 5 folds x {cfg.epochs} epochs, "
          f"no early stop): {rates['predicted_full_run_minutes']:.1f} min on {env.device_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
