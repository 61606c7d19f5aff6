"""Batch augmentation and normalisation on the device (uint8 in, normalised float out)."""
from __future__ import annotations

import torch

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _flip_rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    turns = torch.randint(0, 4, (n,), generator=gen, device=x.device)
    out = x.clone()
    for k in (1, 2, 3):  # histology has no up: every 90-degree rotation is a valid view
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


def _colour(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    bright = _uniform(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    contrast = _uniform(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    satur = _uniform(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    x = x * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return ((x - grey) * satur + grey).clamp(0, 1)


def _hed_jitter(x: torch.Tensor, gen: torch.Generator, sigma: float) -> torch.Tensor:
    """Scale and shift the stain concentrations: mimics staining differences between labs."""
    n, dev = x.shape[0], x.device
    rgb_from_hed = _RGB_FROM_HED.to(dev, x.dtype)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    od = -torch.log(x.clamp(min=1e-6))  # optical density
    hed = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
    alpha = _uniform(n * 3, 1 - sigma, 1 + sigma, gen, dev).view(n, 3, 1, 1)
    beta = _uniform(n * 3, -sigma, sigma, gen, dev).view(n, 3, 1, 1)
    od = torch.einsum("ndhw,dc->nchw", hed * alpha + beta, rgb_from_hed)
    return torch.exp(-od).clamp(0, 1)


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1] with leading dims flattened."""
    x = batch_uint8.reshape(-1, *batch_uint8.shape[-3:]).permute(0, 3, 1, 2)
    return x.float().div_(255)


def augment(x: torch.Tensor, gen: torch.Generator, colour: float = 0.1, stain: float = 0.03) -> torch.Tensor:
    """Flips, 90-degree rotations, colour and HED stain jitter on (N, 3, H, W) floats in [0, 1]."""
    x = _flip_rotate(x, gen)
    x = _colour(x, gen, colour)
    return _hed_jitter(x, gen, stain) if stain > 0 else x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def prepare_batch(batch_uint8: torch.Tensor, mean, std, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 (B, M, H, W, 3) -> normalised float (B, M, 3, H, W); augmented when gen is given."""
    b, m = batch_uint8.shape[:2]
    x = to_float(batch_uint8)
    if gen is not None:
        x = augment(x, gen)
    x = normalize(x, mean, std)
    return x.reshape(b, m, *x.shape[1:])
