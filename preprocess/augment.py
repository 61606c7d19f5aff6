"""Batch augmentation and normalisation on the device (uint8 in, normalised float out).

Every random choice is drawn for the whole batch at once and applied with torch.where or a
batched matrix product, so a batch causes no host-device synchronisation and few passes over
memory: flips on the uint8 images, then colour jitter as one affine colour map per image, then
stain jitter as one affine map of optical densities per image. Images stay channels-last from
the cache to the model: prepare_batch returns (B, M, 3, H, W) whose slot slices x[:, m] are
channels_last tensors, which the branches take without a copy.
"""
from __future__ import annotations

import torch

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)  # a constant: inverted once, not per batch
LUMA = torch.tensor([0.299, 0.587, 0.114])  # grey = RGB . LUMA (ITU-R 601), sums to 1
COLOUR_JITTER, STAIN_JITTER = 0.1, 0.1  # see the README: both move real images ~8 grey levels
_ON_DEVICE: dict = {}  # (name, device) -> the constant there, copied once


def device_constant(name: str, value: torch.Tensor, device) -> torch.Tensor:
    """A constant on `device`, copied there once per process (no copy from the host per batch)."""
    key = (name, device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = value.to(device)
    return _ON_DEVICE[key]


def _uniform(shape, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, device=device)


def flip_rotate(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, H, W, 3) uint8: horizontal flips and 180-degree turns, the views a rectangular frame
    keeps (histology has no up, but a 90-degree turn would stand a landscape frame on end)."""
    n, dev = images.shape[0], images.device
    coin = lambda: (torch.rand(n, generator=gen, device=dev) < 0.5)[:, None, None, None]
    images = torch.where(coin(), images.flip(2), images)
    return torch.where(coin(), images.flip(1, 2), images)


# Test-time views of a (B, M, H, W, 3) batch: the plain frame, its mirror images and its
# 180-degree turn, the same symmetries the training augmentation draws from.
TTA_FLIPS = ((), (3,), (2,), (2, 3))


def test_views(batch_uint8: torch.Tensor, tta: bool):
    """The views of a batch averaged at evaluation: all four flips, or the plain view only."""
    for dims in TTA_FLIPS if tta else TTA_FLIPS[:1]:
        yield batch_uint8.flip(dims) if dims else batch_uint8


def colour_map(x: torch.Tensor, gen: torch.Generator, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation jitter of (N, P, 3) pixels as y = x @ M + o.

    brightness b, contrast c around the image mean m, saturation s towards grey:
    y = b*c*(s*I + (1-s)*LUMA 1^T) x + b*m*(1-c) (the luma weights sum to 1).
    """
    n, dev = x.shape[0], x.device
    b, c, s = _uniform((3, n, 1, 1), 1 - strength, 1 + strength, gen, dev)
    mix = s * torch.eye(3, device=dev) + (1 - s) * device_constant("luma", LUMA, dev)[:, None]
    mean = x.mean(dim=(1, 2))[:, None, None]
    return b * c * mix, (b * mean * (1 - c)).expand(n, 1, 3)


def stain_map(gen: torch.Generator, n: int, sigma: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (1 +- sigma) and shift (+- sigma) of haematoxylin, eosin and DAB concentrations,
    as one map of optical densities: od' = od @ (HED_FROM_RGB diag(a) RGB_FROM_HED) + b RGB_FROM_HED."""
    alpha = _uniform((n, 3), 1 - sigma, 1 + sigma, gen, device)
    beta = _uniform((n, 1, 3), -sigma, sigma, gen, device)
    to_hed, to_rgb = device_constant("hed_from_rgb", HED_FROM_RGB, device), device_constant("rgb_from_hed", RGB_FROM_HED, device)
    return to_hed @ (alpha[:, :, None] * to_rgb), beta @ to_rgb


def augment(pixels: torch.Tensor, gen: torch.Generator, colour: float = COLOUR_JITTER,
            stain: float = STAIN_JITTER) -> torch.Tensor:
    """Colour and stain jitter of (N, P, 3) float pixels in [0, 1]."""
    matrix, offset = colour_map(pixels, gen, colour)
    pixels = torch.baddbmm(offset, pixels, matrix).clamp_(0, 1)
    if stain <= 0:
        return pixels
    matrix, offset = stain_map(gen, pixels.shape[0], stain, pixels.device)
    density = torch.baddbmm(offset, pixels.clamp(min=1e-6).log_().neg_(), matrix)
    return density.neg_().exp_().clamp_(0, 1)


def prepare_batch(batch_uint8: torch.Tensor, mean, std, gen: torch.Generator | None,
                  jitter: tuple[float, float] = (COLOUR_JITTER, STAIN_JITTER), stain=None) -> torch.Tensor:
    """uint8 (B, M, H, W, 3) -> normalised float (B, M, 3, H, W); stain-normalised by `stain`
    (preprocess.stain, a fold's fitted reference) when given, then augmented when gen is given
    (flips and turns, then colour and stain jitter of the given strengths): the jitter moves
    the normalised colours, as a new scanner would.

    The images are laid out slot-major and channels-last once, here: x[:, m] is then a
    channels_last (B, 3, H, W) tensor with no further copy.
    """
    b, m, h, w, c = batch_uint8.shape
    images = batch_uint8.transpose(0, 1).reshape(m * b, h, w, c)
    if gen is not None:
        images = flip_rotate(images, gen)
    pixels = images.reshape(m * b, h * w, c).float().div_(255)
    if stain is not None:
        pixels = stain(pixels)
    if gen is not None and max(jitter) > 0:
        pixels = augment(pixels, gen, *jitter)
    # A model's pixel_mean/pixel_std live on its device already: as_tensor copies nothing then.
    dev = pixels.device
    pixels = (pixels - torch.as_tensor(mean, device=dev)) / torch.as_tensor(std, device=dev)
    return pixels.view(m, b, h, w, c).permute(1, 0, 4, 2, 3)


def model_input(batch_uint8: torch.Tensor, model, gen: torch.Generator | None = None,
                jitter: tuple[float, float] = (COLOUR_JITTER, STAIN_JITTER), stain: bool = True) -> torch.Tensor:
    """prepare_batch with what the model carries: its backbone's normalisation constants and
    its fold's stain reference (None without --stain-norm; not applied again with stain=False,
    to frames that are normalised already)."""
    return prepare_batch(batch_uint8, model.pixel_mean, model.pixel_std, gen, jitter,
                         getattr(model, "stain", None) if stain else None)
