"""--freeze-backbone: the encoder runs once per image and view; every experiment trains on the
cached maps.

Views: the plain frame, both mirror images and the 180-degree turn (preprocess.augment's
TTA_FLIPS). Training draws one of the four per image (the flip augmentation of fine-tuning;
colour and stain jitter cannot be applied to maps), evaluation averages them (--tta on) or
takes the plain one. Maps are encoded under the device's autocast dtype and stored in fp16
(optionally pooled to --feature-grid cells), keyed by encoder, weights, frame size, grid, dtype
and the image cache, as one .npy on local disk (or --cache-dir), shared by every experiment of a
study and by later runs. Where they live is decided after the encoder is released: see
place_features.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from backbones import create_backbone, data_config, encoder_key
from backbones.encoder import feature_map
from config import ConfigError
from preprocess.augment import TTA_FLIPS, prepare_batch, test_views
from preprocess.dataset import ImageSource, reads_levels, upload_rows
from preprocess.image_source import copy_to_device
from preprocess.preprocess import cache_key
from utils.device import MAX_JOBS_PER_GPU, empty_cache
from utils.engine.train import amp_context
from utils.env import available_memory
from utils.files import FEATURE_CACHE_FILE, atomic_write_text, steps

log = logging.getLogger("mmnet")


class FeatureSource:
    """Cached encoder maps (N, V, C, h, w) where the model runs; .gather() still gives the
    images (Grad-CAM and the predictor explain and run the whole model on pixels)."""

    def __init__(self, maps, images: ImageSource):
        self.maps, self.images, self.device = maps, images, images.device
        self.on_device = isinstance(maps, torch.Tensor) and maps.device.type == self.device.type

    def upload(self, samples: np.ndarray):
        """As ImageSource.upload: one copy of the indices when the maps are on the device."""
        return upload_rows(samples, self.device) if self.on_device else samples

    def gather(self, tuples, levels: bool = False):
        return self.images.gather(tuples, levels)

    def _maps(self, tuples, view: torch.Tensor | int, levels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, C, h, w) float maps of one view per image (zeros where a slot is empty) and
        the mask (magnification codes with `levels`, as ImageSource.gather)."""
        if self.on_device:  # indices, views and mask stay on the device
            index = tuples if isinstance(tuples, torch.Tensor) else self.upload(tuples)
            mask = index >= 0
            picked = self.maps[index.clamp(min=0), view.to(self.device) if isinstance(view, torch.Tensor) else view]
            tuples = index
        else:  # host array or memmap: read the rows, then copy
            rows = np.where(tuples >= 0, tuples, 0)
            mask = torch.from_numpy(tuples >= 0).to(self.device)
            views = view.cpu().numpy() if isinstance(view, torch.Tensor) else view
            picked = torch.from_numpy(np.asarray(self.maps[rows, views])).to(self.device)
        maps = picked.float() * mask[..., None, None, None]
        return maps.contiguous(), self.images.slot_codes(tuples, mask) if levels else mask.float()

    def train_batch(self, tuples, model, generator: torch.Generator, jitter: tuple,
                    quarter_turns: bool = False):  # maps are cached for the four flip views only
        view = torch.randint(len(TTA_FLIPS), tuple(tuples.shape), generator=generator, device=generator.device)
        return self._maps(tuples, view, reads_levels(model))  # stays on the device when the maps are there

    def views(self, tuples, model, tta: bool):
        for view in range(len(TTA_FLIPS) if tta else 1):
            yield self._maps(tuples, view, reads_levels(model))


def feature_key(cfg, cache_name: str, amp_dtype: str) -> str:
    """What the cached maps depend on: the encoder's weights (backbones.encoder_key: name,
    weights, frame size, grid), the images and the dtype they were encoded under."""
    parts = [*encoder_key(cfg), cache_name, len(TTA_FLIPS), amp_dtype]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def feature_cache_dir(cfg) -> Path:
    """--cache-dir when given. Else, with --executor ray, beside the image cache on the storage
    every node sees (built once, read by every node's workers); otherwise the container's local
    disk, never the output folder (on a pod a network volume, where a batch's random rows cost a
    round trip each; a worker places the maps in memory once, so Ray's nodes pay it once)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if cfg.executor == "ray":
        return cfg.resolved_cache_dir() / "features"
    return Path(tempfile.gettempdir()) / "mmnet-features"


@torch.inference_mode()
def encode_to_file(encoder, images: ImageSource, path: Path, batch: int, amp_dtype: str) -> None:
    """Every image's maps in the evaluation views, encoded under the device's autocast dtype and
    written through a memory-mapped .npy: never a second full copy in memory."""
    mean, std = data_config(encoder)
    partial = path.with_suffix(f".{os.getpid()}.partial.npy")
    try:
        _encode_rows(encoder, images, partial, batch, amp_dtype, mean, std)
    except BaseException:  # an interrupted or failed encoding leaves no half file behind
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def _encode_rows(encoder, images: ImageSource, partial: Path, batch: int, amp_dtype: str, mean, std) -> None:
    rows, out = len(images.images), None
    for start in steps(range(0, rows, batch), "feature cache: encoding images", -(-rows // batch)):
        chunk = np.arange(start, min(rows, start + batch))[:, None]
        pixels, _ = images.gather(chunk)  # (b, 1, H, W, 3)
        for v, view in enumerate(test_views(pixels, tta=True)):  # the views evaluation averages, in order
            with amp_context(images.device.type, amp_dtype):
                maps = feature_map(encoder, prepare_batch(view, mean, std, None)[:, 0])
            if out is None:
                out = _open_cache_file(partial, (rows, len(TTA_FLIPS), *maps.shape[1:]))
            out[start:start + len(chunk), v] = maps.half().cpu().numpy()
    out.flush()


def _open_cache_file(path: Path, shape: tuple) -> np.memmap:
    needed, free = int(np.prod(shape)) * 2, shutil.disk_usage(path.parent).free
    if needed > 0.95 * free:
        raise ConfigError(f"the feature cache needs {needed / 1e9:.1f} GB and {path.parent} has {free / 1e9:.1f} GB "
                          f"free: pass --cache-dir on a larger local disk, or --feature-grid 8 to pool the maps")
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)


PLACES = {"gpu": "GPU memory", "host": "host memory (one read-only mapping shared by every worker)",
          "disk": "a memory-mapped file, rows read from disk per batch"}


def placement(size: int, gpu_free: int | None, host_free: int, sharing: int = 1) -> str:
    """Where maps of `size` bytes go: 'gpu' when they take at most half of the GPU's free memory
    (measured after the encoder is released, split between the `sharing` jobs on that GPU);
    else one read-only mapping of the file, which the page cache holds once for every worker
    process: 'host' when it fits in half of the container's free memory, 'disk' when rows
    will be read from disk."""
    if gpu_free is not None and size <= 0.5 * gpu_free / sharing:
        return "gpu"
    return "host" if size <= 0.5 * host_free else "disk"


def place_features(path: Path, device: torch.device, sharing: int = 1):
    """The cached maps where placement() puts them, and that place in words."""
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    where = placement(path.stat().st_size, gpu_free, available_memory(), sharing)
    mapped = np.load(path, mmap_mode="r")
    return (copy_to_device(mapped, device) if where == "gpu" else mapped), PLACES[where]


def _build(cfg, images: ImageSource, path: Path, env) -> None:
    """Encode once; the encoder is gone (and its device memory returned) when this returns."""
    encoder = create_backbone(dataclasses.replace(cfg, freeze_backbone=True))[0].to(images.device).eval()
    encode_to_file(encoder, images, path, max(1, env.micro_batch * 4), env.amp_dtype)
    del encoder
    gc.collect()
    empty_cache(images.device.type)


def attach_features(cfg, study):
    """The study with its source replaced by cached encoder maps (built once per key)."""
    if not cfg.freeze_backbone:
        return study
    images = study.source.images if isinstance(study.source, FeatureSource) else study.source
    images_key = cache_key(study.index, study.data_dir, cfg.image_size)
    folder = feature_cache_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"features_{feature_key(cfg, images_key, study.env.amp_dtype)}.npy"
    with FileLock(str(path) + ".lock"):  # one process encodes; the others wait, then read its file
        if not path.is_file():
            _build(cfg, images, path, study.env)
            log.info("feature cache: %d images of %s -> %s (%.2f GB)", len(images.images), cfg.backbone, path,
                     path.stat().st_size / 1e9)
    maps, where = place_features(path, images.device, jobs_per_gpu(cfg))
    log.info("feature cache: %s (%.2f GB) in %s", path.name, path.stat().st_size / 1e9, where)
    atomic_write_text(Path(cfg.output_dir) / FEATURE_CACHE_FILE, json.dumps(
        {"path": str(path), "bytes": path.stat().st_size, "shape": list(maps.shape), "where": where}, indent=2))
    return dataclasses.replace(study, source=FeatureSource(maps, images))


def jobs_per_gpu(cfg) -> int:
    """Jobs that place their own copy of the maps on one GPU (--jobs above the GPU count; auto
    counts as the most it may choose)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.jobs == "auto":
        return MAX_JOBS_PER_GPU
    return max(1, -(-cfg.jobs // gpus)) if gpus and cfg.jobs else 1
