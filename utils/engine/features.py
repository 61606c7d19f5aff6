"""--freeze-backbone: the encoder runs once per image and view; every experiment trains on the
cached maps.

Views: the plain frame, both mirror images and the 180-degree turn (preprocess.augment's
TTA_FLIPS). Training draws one of the four per image (the flip augmentation of fine-tuning;
colour and stain jitter cannot be applied to maps), evaluation averages them (--tta on) or
takes the plain one. Maps are fp16, keyed by encoder, weights, frame size and the image cache,
stored as one .npy under the cache folder and shared by every experiment of a study and by
later runs. Where they live: on the GPU when they take at most half of its free memory, else
in host memory when they take at most half of the available RAM, else memory-mapped from disk
(rows are then read per batch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from backbones import create_backbone, data_config
from backbones.encoder import feature_map
from preprocess.augment import TTA_FLIPS, prepare_batch, test_views
from preprocess.dataset import ImageSource, reads_levels, upload_rows
from preprocess.preprocess import cache_key
from utils.files import steps

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


def feature_key(cfg, cache_name: str) -> str:
    """What the cached maps depend on: encoder, weights, frame size, the images."""
    init = cfg.seed if cfg.pretrained == "off" and not cfg.pretrained_file else "weights"  # random init: by seed
    parts = [cfg.backbone, cfg.pretrained, cfg.pretrained_file, init, cfg.image_size, cache_name, len(TTA_FLIPS)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def encode_images(encoder, images: ImageSource, rows: int, batch: int) -> np.ndarray:
    mean, std = data_config(encoder)
    out = None
    for start in steps(range(0, rows, batch), "feature cache: encoding images", -(-rows // batch)):
        chunk = np.arange(start, min(rows, start + batch))[:, None]
        pixels, _ = images.gather(chunk)  # (b, 1, H, W, 3)
        for v, view in enumerate(test_views(pixels, tta=True)):  # the views evaluation averages, in order
            maps = feature_map(encoder, prepare_batch(view, mean, std, None)[:, 0]).half().cpu().numpy()
            if out is None:
                out = np.zeros((rows, len(TTA_FLIPS), *maps.shape[1:]), dtype=np.float16)
            out[start:start + len(chunk), v] = maps
    return out


def _place(maps_path: Path, device: torch.device):
    """On the GPU, in host memory or memory-mapped, by size (see the module docstring)."""
    size = maps_path.stat().st_size
    if device.type == "cuda" and size <= 0.5 * torch.cuda.mem_get_info()[0]:
        return torch.from_numpy(np.load(maps_path)).to(device), "GPU memory"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size <= 0.5 * available:
        return np.load(maps_path), "host memory"
    return np.load(maps_path, mmap_mode="r"), "a memory-mapped file"


def attach_features(cfg, study):
    """The study with its source replaced by cached encoder maps (built once per key)."""
    if not cfg.freeze_backbone:
        return study
    images = study.source.images if isinstance(study.source, FeatureSource) else study.source
    images_key = cache_key(study.index, study.data_dir, cfg.image_size)
    path = cfg.resolved_cache_dir() / f"features_{feature_key(cfg, images_key)}.npy"
    if not path.is_file():
        encoder = create_backbone(dataclasses.replace(cfg, freeze_backbone=True))[0].to(images.device).eval()
        maps = encode_images(encoder, images, len(images.images), batch=max(1, study.env.micro_batch * 4))
        tmp = path.with_suffix(".partial.npy")
        np.save(tmp, maps)
        os.replace(tmp, path)
        log.info("feature cache: %d images x %d views of %s -> %s (%.2f GB)", maps.shape[0], maps.shape[1],
                 cfg.backbone, path, path.stat().st_size / 1e9)
    maps, where = _place(path, images.device)
    log.info("feature cache: %s (%.2f GB) in %s", path.name, path.stat().st_size / 1e9, where)
    return dataclasses.replace(study, source=FeatureSource(maps, images))
