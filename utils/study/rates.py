"""Measuring primitives of the benchmark: each times one real code path on this device."""
from __future__ import annotations

import copy
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import utils.engine.train as train_module
from preprocess.dataset import PatientImages, training_tuples
from preprocess.demo import demo_filenames, write_tree
from preprocess.preprocess import build_cache, frame_shape, index_dataset
from utils.device import HostSyncCounter
from utils.engine.graphs import GRAPH_WARMUP_STEPS, EagerRecorder, evaluation_recorder
from utils.engine.inference import FoldModel, predict_patient
from utils.engine.losses import StudyLoss
from utils.engine.train import (
    EpochPlan,
    LoopSettings,
    amp_context,
    new_fold_state,
    predict,
    recorded_update,
    train_one_epoch,
)


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


def pipeline_efficiency(state, loop: LoopSettings, model_alone, batches: int, rounds: int = 3) -> dict:
    """End-to-end training tuples/s (cache -> gather -> augmentation -> model -> optimizer)
    over the model alone (model_alone(): the same steps on resident tensors), each the best of
    `rounds` rounds taken in turn, so that a slow spell of a shared machine falls on both
    (docs/time.md: what a pair timed in series read). Both bests are returned with the ratio, so
    the row can be recomputed from the table."""
    generator = torch.Generator(device=loop.source.device).manual_seed(0)
    count, loop_best, alone_best = batches * loop.batch_size, 0.0, 0.0
    for round_ in range(rounds):
        started, ended = training_span(state, loop, count, generator, seed=100 + round_)
        loop_best = max(loop_best, count / (ended - started))
        alone_best = max(alone_best, model_alone())
    return {"train_tuples_per_s_end_to_end_best": loop_best, "train_tuples_per_s_model_alone": alone_best,
            "pipeline_efficiency": loop_best / alone_best}


def training_span(state, loop: LoopSettings, count: int, generator: torch.Generator, seed: int) -> tuple[float, float]:
    """Wall-clock (start, end) of training `count` tuples through the real loop, the device
    synced at both ends (time.time(): comparable between the processes of utils.study.jobs_rate)."""
    tuples, owners = training_tuples(loop.data, count, np.random.default_rng(seed))
    sync(loop.source.device.type)
    started = time.time()
    train_one_epoch(state, loop, EpochPlan(tuples, owners, generator, 0))
    sync(loop.source.device.type)
    return started, time.time()


def time_train_and_eval(state, loop: LoopSettings, train_count: int, eval_tuples: np.ndarray,
                        warmup_batches: int = 2) -> dict:
    """Tuples/s of training (cache -> gather -> device augmentation -> model -> optimizer) and
    of evaluation, each timed after warm-up batches, through the real loop functions."""
    device = loop.source.device.type
    gen = torch.Generator(device=device).manual_seed(0)

    def train(count: int, seed: int) -> float:
        started, ended = training_span(state, loop, count, gen, seed)
        return count / (ended - started)

    def evaluate(tuples: np.ndarray) -> float:
        sync(device)
        started = time.perf_counter()
        predict(state.model, loop.source, tuples, loop.batch_size * 2, loop.amp_dtype, tta=False)
        sync(device)
        return len(tuples) / (time.perf_counter() - started)

    train(loop.batch_size * warmup_batches, 0)  # warm-up: allocator, cuDNN autotuning, lazy imports (and a graph's capture)
    rates = {"train": train(train_count, 1)}
    evaluate(eval_tuples[:loop.batch_size])
    rates["eval"] = evaluate(eval_tuples)
    return rates


# Published dense bf16 tensor throughput (TFLOP/s) and the share of it a ResNet-type network
# sustains (an assumption, stated with every figure computed from it).
GPU_TFLOPS = {"H100": 989.0, "RTX 4090": 165.0, "A40": 149.7}
GPU_UTILISATION = 0.25


def gpu_ms(gflop: float, gpu: str) -> float:
    """Milliseconds for `gflop` of work on a GPU at GPU_UTILISATION of its bf16 peak."""
    return gflop / (GPU_TFLOPS[gpu] * 1e3 * GPU_UTILISATION) * 1e3


def forward_gflop(model, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Counted forward GFLOP of one batch (torch's FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x, mask)
    return counter.get_total_flops() / 1e9


def decode_ms_per_image(images: int, size: int, threads: int) -> float:
    """predict.py's threaded decoding of full-size BreakHis PNGs, per image."""
    from preprocess.patient_folder import load_patient

    with tempfile.TemporaryDirectory() as tmp:
        names = demo_filenames(patients=1, images_per_mag=max(1, images // 4))
        write_tree(Path(tmp) / "tree", names, workers=1)
        started = time.perf_counter()
        cache, _, _ = load_patient(Path(tmp) / "tree", size, threads)
        return 1000 * (time.perf_counter() - started) / len(cache)


def predictor_latency(model, cfg, cache, data, device: str, repeats: int = 3) -> dict:
    """predict.py's model path on one 100-image patient (25 per magnification, each tuple
    averaged over the test-time views), warm, best of N, for 1 and 5 fold models (the 5-fold
    ensemble is 5 such passes; on a CPU it is computed as 5 x one model, not timed), and the
    same work predicted for GPUs from its counted FLOPs."""
    by_mag = {m: data.rows[0][i].tolist() for i, m in enumerate(cfg.magnifications)}
    fold_model = FoldModel(model.eval(), cfg, 0.5, Path("benchmark"))
    repeats = repeats if device != "cpu" else 1
    first = predict_patient([fold_model], cache, by_mag, device)  # warm-up
    with HostSyncCounter() as counter:
        predict_patient([fold_model], cache, by_mag, device)
    single = min(predict_patient([fold_model], cache, by_mag, device)["milliseconds"] for _ in range(repeats))
    graphed_ops = graphed_patient_ops(fold_model, cache, by_mag, device)
    ensemble = 5 * single if device == "cpu" else min(
        predict_patient([fold_model] * 5, cache, by_mag, device)["milliseconds"] for _ in range(repeats))
    views = 4 if cfg.tta == "on" else 1
    x = torch.zeros(1, len(cfg.magnifications), 3, *frame_shape(cfg.image_size), device=device)
    gflop = forward_gflop(model, x, torch.ones(1, len(cfg.magnifications), device=device)) * first["tuples_per_model"] * views
    rows = {"model_ms_per_patient_1_models": single, "model_ms_per_patient_5_models": ensemble,
            "ops_per_patient": counter.ops, "ops_per_patient_graphed": graphed_ops, "host_syncs_per_patient": counter.total,
            "model_gflop_per_patient_1_model": gflop}
    rows.update({f"model_ms_per_patient_5_models_{gpu.replace(' ', '_')}_predicted": gpu_ms(5 * gflop, gpu)
                 for gpu in GPU_TFLOPS})
    return rows


def graphed_patient_ops(fold_model, cache, by_mag: dict, device: str) -> int:
    """Dispatched operators per patient and model with predict.py --cuda-graphs on, after the
    recording (its replay counted as one launch): the views' gather and flips, the input copy,
    the means and the one copy to the host are what is left."""
    with evaluation_recorder(lambda _device: OneLaunchRecorder()):
        for _ in range(GRAPH_WARMUP_STEPS + 1):  # eager warm-up calls, then the recording
            predict_patient([fold_model], cache, by_mag, device, graphs=True)
        with HostSyncCounter() as counter:
            predict_patient([fold_model], cache, by_mag, device, graphs=True)
    return counter.ops + 1  # + the graph's launch


def step_counts(state, loop: LoopSettings, steps: int = 2, graphed: bool = False) -> dict:
    """Host syncs and dispatched operators per training step (HostSyncCounter), on a
    device-resident cache, as a GPU runs the step: the whole batch in one pass (a CPU's smaller
    micro-batches would multiply the forward and backward operators). graphed: the step as
    --cuda-graphs runs it after capture, whose recorded update is one launch (the operators left
    are the batch's gather and augmentation, the input copies and the learning-rate fills)."""
    from utils.device import counting_syncs, uncount_host_optimizer

    source = loop.source
    if not source.on_device:  # the same images (normalised ones stay normalised), resident
        source = copy.copy(source)
        source.on_device = True
        source.images = torch.from_numpy(np.asarray(loop.source.images))
    counted = dataclasses.replace(loop, source=source, graphs=graphed)
    accumulation, state.accumulation = state.accumulation, 1
    skipped = GRAPH_WARMUP_STEPS + 1 if graphed else 1  # after the optimizer's state exists (and the capture)
    tuples, owners = training_tuples(loop.data, (steps + skipped) * loop.batch_size, np.random.default_rng(0))
    plan = EpochPlan(source.upload(tuples), owners, torch.Generator(device=source.device).manual_seed(0), 0)
    uncount_host_optimizer(state.optimizer)  # torch < 2.4 on the CPU: not the fused kernel a GPU runs
    state.graphed = recorded_update(state, counted, OneLaunchRecorder()) if graphed else None
    real_step, counters = train_module._step, []
    train_module._step = counting_syncs(real_step, counters.append)
    try:
        train_one_epoch(state, counted, plan)
    finally:
        train_module._step, state.accumulation, state.graphed = real_step, accumulation, None
    counters = counters[skipped:]
    return {"host_syncs_per_step": sum(c.total for c in counters) / steps,
            "ops_per_step": sum(c.ops for c in counters) / steps + graphed,  # + the graph's launch
            "kernels_per_step": sum(c.kernels for c in counters) / steps + graphed}


class OneLaunchRecorder(EagerRecorder):
    """The eager stand-in whose replay runs out of the counters' sight: a CUDA graph's replay is
    one launch, whatever it holds (step_counts adds it)."""

    def replay(self):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return super().replay()


def fixed_seconds_per_fold(cfg, env, loop: LoopSettings) -> dict:
    """What a fold costs besides its epochs: building the model and optimizer, the first step
    (allocator, autotuning, lazy init), and writing the kept fold model at its end."""
    from utils.engine.saving import save_checkpoint

    started = time.perf_counter()
    state = new_fold_state(cfg, env, steps_per_epoch=1, seed=0)
    sync(env.device)
    built = time.perf_counter() - started
    tuples, owners = training_tuples(loop.data, loop.batch_size, np.random.default_rng(0))
    started = time.perf_counter()
    train_one_epoch(state, loop, EpochPlan(tuples, owners, torch.Generator(device=env.device).manual_seed(0), 0))
    sync(env.device)
    first = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        save_checkpoint({"model": state.model.state_dict()}, Path(tmp) / "fold0.pt")
        written = time.perf_counter() - started
    return {"fold_build_s": built, "fold_first_step_s": first, "fold_end_write_s": written,
            "fold_fixed_s": built + first + written}


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
