"""Measuring primitives of the benchmark: each times one real code path on this device."""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from preprocess.dataset import PatientImages, training_tuples
from preprocess.demo import demo_filenames, write_tree
from preprocess.preprocess import build_cache, frame_shape, index_dataset
from utils.engine.inference import FoldModel, predict_patient
from utils.engine.losses import StudyLoss
from utils.engine.train import EpochPlan, LoopSettings, amp_context, predict, train_one_epoch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cache_build_rate(images: int, workers: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        names = demo_filenames(patients=max(2, images // 12), images_per_mag=3)[:images]
        write_tree(Path(tmp) / "tree", names, workers=workers)
        index, _ = index_dataset(Path(tmp) / "tree", check_files=False)
        started = time.perf_counter()
        build_cache(index, Path(tmp) / "tree", Path(tmp) / "cache", size, workers)
        return len(index) / (time.perf_counter() - started)


def synthetic_patients(n_patients: int, per_mag: int, mags: int) -> tuple[np.ndarray, PatientImages]:
    rows = [[np.arange(per_mag) + (p * mags + m) * per_mag for m in range(mags)] for p in range(n_patients)]
    data = PatientImages([f"p{p}" for p in range(n_patients)], np.arange(n_patients) % 2,
                         np.arange(n_patients) % 8, [str(p) for p in range(n_patients)], rows)
    return np.arange(n_patients * mags * per_mag), data


def model_alone_rate(state, cfg, env, batches: int, slots: int) -> float:
    """The same steps (micro-batches, accumulation, optimizer) on tensors already on the device."""
    micro, steps_per_batch = env.micro_batch, -(-env.batch_size // env.micro_batch)
    x = torch.randn(micro, slots, 3, *frame_shape(cfg.image_size), device=env.device)
    mask = torch.ones(micro, slots, device=env.device)
    labels = torch.randint(0, 2, (micro,), device=env.device)
    subtypes = torch.randint(0, 8, (micro,), device=env.device)
    loss_fn = StudyLoss(cfg, None)
    state.model.train()
    sync(env.device)
    started = time.perf_counter()
    for _ in range(batches):
        state.optimizer.zero_grad(set_to_none=True)
        for _ in range(steps_per_batch):
            with amp_context(env.device, env.amp_dtype):
                out = state.model(x, mask)
            state.scaler.scale(loss_fn(out, labels, subtypes)[0] / steps_per_batch).backward()
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    sync(env.device)
    return batches * micro * steps_per_batch / (time.perf_counter() - started)


def time_train_and_eval(state, loop: LoopSettings, train_count: int, eval_tuples: np.ndarray) -> dict:
    """Tuples/s of training (cache -> gather -> device augmentation -> model -> optimizer) and
    of evaluation, each timed after one warm-up batch, through the real loop functions."""
    device = loop.source.device.type
    gen = torch.Generator(device=device).manual_seed(0)

    def train(count: int, seed: int) -> float:
        tuples, owners = training_tuples(loop.data, count, np.random.default_rng(seed))
        sync(device)
        started = time.perf_counter()
        train_one_epoch(state, loop, EpochPlan(tuples, owners, gen, 0))
        sync(device)
        return count / (time.perf_counter() - started)

    def evaluate(tuples: np.ndarray) -> float:
        sync(device)
        started = time.perf_counter()
        predict(state.model, loop.source, tuples, loop.batch_size * 2, loop.amp_dtype, tta=False)
        sync(device)
        return len(tuples) / (time.perf_counter() - started)

    train(loop.batch_size * 2, 0)  # warm-up (two batches): allocator, cuDNN autotuning, lazy imports
    rates = {"train": train(train_count, 1)}
    evaluate(eval_tuples[:loop.batch_size])
    rates["eval"] = evaluate(eval_tuples)
    return rates


def predictor_latency(model, cfg, cache, data, device: str, repeats: int = 3) -> tuple[float, float]:
    """predict.py's model path on one 100-image patient (25 per magnification, each tuple
    averaged over the test-time views), warm, best of N; the 5-fold ensemble is 5 such passes.
    On a CPU one timed pass of one model, and no ensemble figure (NaN): a pass there takes
    seconds, and five of them would be measured at the cost of minutes."""
    by_mag = {m: data.rows[0][i].tolist() for i, m in enumerate(cfg.magnifications)}
    fold_model = FoldModel(model.eval(), cfg, 0.5, Path("benchmark"))
    repeats = repeats if device != "cpu" else 1
    predict_patient([fold_model], cache, by_mag, device)  # warm-up
    single = min(predict_patient([fold_model], cache, by_mag, device)["milliseconds"] for _ in range(repeats))
    if device == "cpu":
        return single, float("nan")
    ensemble = min(predict_patient([fold_model] * 5, cache, by_mag, device)["milliseconds"] for _ in range(repeats))
    return single, ensemble


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
