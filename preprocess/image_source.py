"""Where the model reads its images: the uint8 cache on the device (a batch is one indexing op)
or mapped on the host, gathered into normalised, augmented batches with their masks."""
from __future__ import annotations

import copy

import numpy as np
import torch

from config import MAGNIFICATIONS
from preprocess.augment import TTA_FLIPS, model_input


class ImageSource:
    """The cache where the model runs: on a GPU the whole uint8 array is copied to device
    memory once, so a batch is one indexing op with no loader, worker or host copy in between.
    `on_device` forces that path on or off (tests run it on the CPU).
    """

    def __init__(self, cache: np.ndarray, device: str, on_device: bool | None = None, mags: np.ndarray | None = None):
        self.device = torch.device(device)
        self.on_device = self.device.type != "cpu" if on_device is None else on_device
        self.images = copy_to_device(cache, self.device) if self.on_device else cache  # else memmap: rows read on demand
        self.levels = None if mags is None else magnification_codes(mags)  # per cache row: the mask of a MIL bag
        self._device_levels = None if mags is None else torch.from_numpy(self.levels).to(self.device)
        self.stain_applied = False  # True for a fold's copy whose images are stain-normalised already

    def stain_normalised(self, normaliser: torch.nn.Module, rows: int = 64) -> ImageSource:
        """This source with every image stain-normalised once, as uint8 where this one keeps its
        images: a fold's reference is fixed before its first step, so training need not normalise
        every batch again in every epoch. The per-image normalisers see an image's whole pixel
        distribution, which flips and turns do not change, so augmenting after is the same."""
        device = self.device if self.on_device else torch.device("cpu")
        normaliser = normaliser.to(device)
        normalised = torch.empty(tuple(self.images.shape), dtype=torch.uint8, device=device)
        with torch.inference_mode():
            for start in range(0, len(self.images), rows):
                chunk = self.images[start:start + rows]
                chunk = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))
                n, h, w, c = chunk.shape
                pixels = normaliser(chunk.to(device).reshape(n, h * w, c).float().div_(255))
                normalised[start:start + n] = pixels.mul_(255).round_().clamp_(0, 255).to(torch.uint8).view(n, h, w, c)
        source = copy.copy(self)
        source.images = normalised if self.on_device else normalised.numpy()
        source.stain_applied = True
        return source

    def upload(self, samples: np.ndarray):
        """Sample rows where gather() reads them: with the cache on the device, one copy of a
        whole epoch's (or a whole split's) indices, pinned and non-blocking, so no step copies
        from the host; a host cache keeps them as they are."""
        return upload_rows(samples, self.device) if self.on_device else samples

    def gather(self, tuples, levels: bool = False):
        """uint8 (B, M, H, W, 3) on the device and float mask (B, M): 1 where an image is
        present, or with `levels` (models that read them, MIL) its magnification code; 0 where not.
        `tuples`: rows of cache indices (-1: empty), as uploaded by upload() or on the host."""
        if self.on_device:
            index = tuples if isinstance(tuples, torch.Tensor) else self.upload(tuples)
            mask = index >= 0
            batch = self.images[index.clamp(min=0)]
        else:
            mask = torch.from_numpy(tuples >= 0)
            flat = self.images[np.where(tuples >= 0, tuples, 0).reshape(-1)]  # fancy index: a writable copy
            batch = torch.from_numpy(flat).reshape(*tuples.shape, *flat.shape[1:])
        # Missing magnifications become black images; the mask keeps them out of the fusion.
        batch = batch * mask[..., None, None, None].to(batch.dtype)
        return batch, self.slot_codes(tuples, mask) if levels else mask.float()

    def slot_codes(self, tuples, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) float magnification codes of the present slots (0 where empty)."""
        if self.levels is None:
            raise ValueError("this model reads magnification codes: build the ImageSource with mags=")
        if isinstance(tuples, torch.Tensor):  # built on the device from device indices
            return torch.where(mask, self._device_levels[tuples.clamp(min=0)], 0).float()
        codes = np.where(tuples >= 0, self.levels[np.where(tuples >= 0, tuples, 0)], 0)
        return torch.from_numpy(codes).to(mask.device).float()

    def train_batch(self, tuples: np.ndarray, model, generator: torch.Generator, jitter: tuple,
                    quarter_turns: bool = False):
        """The model's input for training: augmented, normalised images and the mask.

        quarter_turns: the whole batch is transposed with probability 1/2 (drawn from torch's
        seeded CPU generator: no device sync); with the per-image flips and 180-degree turns that
        gives every image one of all 8 symmetries of the square, uniformly. Encoders built for
        one frame size (Swin-like) never get the transposed frame."""
        images, mask = self.gather(tuples, reads_levels(model))
        x = model_input(images, model, generator, jitter, stain=not self.stain_applied)
        if quarter_turns and not getattr(model, "fixed_frame", False) and bool(torch.rand(()) < 0.5):
            x = x.transpose(-1, -2)
        return x, mask

    def views(self, tuples: np.ndarray, model, tta: bool):
        """The model's inputs for evaluation, one per test-time view (or the plain view)."""
        images, mask = self.gather(tuples, reads_levels(model))
        yield from evaluation_views(images, mask, model, tta, stain=not self.stain_applied)


def evaluation_views(images: torch.Tensor, mask: torch.Tensor, model, tta: bool, stain: bool = True):
    """(input, mask) of each test-time view of gathered uint8 frames: the frames are stain-
    normalised once (unless `stain` is off: frames of a normalised source) and the views are its
    mirror images. The exported ONNX graph runs this too."""
    x = model_input(images, model, stain=stain)
    for dims in TTA_FLIPS if tta else TTA_FLIPS[:1]:  # dims of (B, M, H, W, 3); x is (B, M, 3, H, W)
        yield (x.flip([d + 1 for d in dims]) if dims else x), mask


def magnification_codes(mags) -> np.ndarray:
    """What a MIL bag's mask holds for an image: 1 + the position of its magnification in
    MAGNIFICATIONS (0 is an empty slot)."""
    return np.searchsorted(MAGNIFICATIONS, np.asarray(mags)) + 1


def reads_levels(model) -> bool:
    """MIL models take each image's magnification code in the mask (backbones/mil.py)."""
    return getattr(model, "reads_levels", False)


def upload_rows(samples: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host index rows to the device: pinned memory and a non-blocking copy on CUDA."""
    rows = torch.from_numpy(np.ascontiguousarray(samples))
    if device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


def copy_to_device(cache: np.ndarray, device: torch.device, rows: int = 512) -> torch.Tensor:
    """An array (the image cache, the feature maps) in device memory, copied in chunks: no second
    host copy of the whole array, and no read-only memmap handed to torch (which warns that it
    is not writable)."""
    dtype = torch.from_numpy(np.empty(0, cache.dtype)).dtype  # not from the array: it may be read-only
    images = torch.empty(cache.shape, dtype=dtype, device=device)
    for start in range(0, len(cache), rows):
        images[start:start + rows].copy_(torch.from_numpy(np.array(cache[start:start + rows])))
    return images
