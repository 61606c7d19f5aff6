"""Stain normalisation (--stain-norm macenko | reinhard): the colour of every image mapped onto a
reference fitted on the training images of one outer fold.

The reference is fitted with torchstain (fit_reference) on a montage of training images only, so
no colour of the test fold reaches training; it lives in the model as buffers, so the fold model
file carries it and the predictor applies the fold's own reference. Images stay raw in the cache:
normalisation runs in the batch path on the device (preprocess.augment.prepare_batch), before the
augmentation, with every image of the batch at once (torchstain normalises one image per call
and reads its size on the host). The batched code follows torchstain's and is tested against it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from config import STAIN_FIT_IMAGES
from preprocess.augment import device_constant

IO, ALPHA, BETA = 240.0, 1, 0.15  # Macenko: transmitted light, angle percentile, transparency (torchstain's defaults)
MIN_TISSUE = 0.01  # share of an image's pixels that must be stained for Macenko to touch it


def _percentile_index(q, count: torch.Tensor) -> torch.Tensor:
    """0-based rank of torchstain's percentile ('nearest') among `count` sorted values, in integer
    arithmetic (rounding half up) so that no float64 is needed (MPS has none)."""
    return ((q * (count - 1) + 50) // 100).clamp(min=0)


JACOBI_SWEEPS = 6  # cyclic Jacobi sweeps: a 3x3 symmetric matrix is diagonal to float precision after 4


def symmetric_eigenvectors(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric (N, 3, 3) matrices as columns, by ascending eigenvalue.

    Cyclic Jacobi rotations in tensor ops: torch.linalg.eigh checks convergence on the host (a
    device synchronisation per batch) and has no MPS kernel. Signs are arbitrary, as eigh's;
    Macenko's stain vectors do not depend on them."""
    a = matrices.clone()
    n = a.shape[0]
    vectors = torch.eye(3, dtype=a.dtype, device=a.device).expand(n, 3, 3).clone()
    for _ in range(JACOBI_SWEEPS):
        for p, q in ((0, 1), (0, 2), (1, 2)):
            theta = 0.5 * torch.atan2(2 * a[:, p, q], a[:, q, q] - a[:, p, p])  # zeroes a[p, q]
            rotation = torch.eye(3, dtype=a.dtype, device=a.device).expand(n, 3, 3).clone()
            rotation[:, p, p], rotation[:, q, q] = theta.cos(), theta.cos()
            rotation[:, p, q], rotation[:, q, p] = theta.sin(), -theta.sin()
            a = rotation.transpose(1, 2) @ a @ rotation
            vectors = vectors @ rotation
    order = a.diagonal(dim1=1, dim2=2).argsort(dim=1)
    return vectors.gather(2, order[:, None, :].expand(n, 3, 3))


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) along dim 1: kthvalue, a selection; an ONNX graph has no such
    operator, so an export sorts and takes the same element."""
    if torch.onnx.is_in_onnx_export():
        return values.sort(dim=1).values[:, k - 1]
    return values.kthvalue(k, dim=1).values


class Macenko(nn.Module):
    """Macenko et al., ISBI 2009: each image's H and E vectors from the extreme angles of its
    stained optical densities, concentrations rescaled to the reference's 99th percentiles."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stain_matrix", torch.zeros(3, 2))  # H and E optical densities (columns)
        self.register_buffer("max_concentration", torch.ones(2))  # their 99th percentiles
        self.register_buffer("fitted", torch.tensor(False))  # unfitted: images pass unchanged

    def fit(self, montage: torch.Tensor) -> None:
        from torchstain.torch.normalizers import TorchMacenkoNormalizer
        fitted = TorchMacenkoNormalizer()
        fitted.fit(montage.permute(2, 0, 1), Io=IO, alpha=ALPHA, beta=BETA)
        self.stain_matrix.copy_(fitted.HERef)
        self.max_concentration.copy_(fitted.maxCRef)
        self.fitted.fill_(True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, P, 3) float in [0, 1] -> the same, normalised; images with too little stain to
        estimate (blank or black frames, empty slots) pass unchanged."""
        n_pixels = pixels.shape[1]
        density = -torch.log((pixels * 255 + 1) / IO)
        stained = (density >= BETA).all(-1)  # (N, P)
        count = stained.sum(1)
        weight = stained.unsqueeze(-1).to(density.dtype)
        mean = (density * weight).sum(1, keepdim=True) / count.clamp(min=1)[:, None, None]
        centred = (density - mean) * weight
        covariance = centred.transpose(1, 2) @ centred / (count - 1).clamp(min=1)[:, None, None]
        plane = symmetric_eigenvectors(covariance)[:, :, 1:]  # the two largest eigenvectors
        projected = density @ plane
        angle = torch.atan2(projected[..., 1], projected[..., 0])
        ordered = torch.where(stained, angle, torch.inf).sort(dim=1).values
        extremes = torch.stack([_percentile_index(ALPHA, count), _percentile_index(100 - ALPHA, count)], 1)
        phi = ordered.gather(1, extremes.clamp(max=n_pixels - 1))  # (N, 2): min and max angle
        vectors = plane @ torch.stack([phi.cos(), phi.sin()], 1)  # (N, 3, 2): v_min, v_max
        h_first = (vectors[:, 0, 0] > vectors[:, 0, 1])[:, None, None]
        stains = torch.where(h_first, vectors, vectors.flip(-1))
        gram = stains.transpose(1, 2) @ stains
        determinant = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
        inverse = torch.stack([gram[:, 1, 1], -gram[:, 0, 1], -gram[:, 1, 0], gram[:, 0, 0]], 1).view(-1, 2, 2)
        pseudo = inverse / determinant.clamp(min=1e-12)[:, None, None] @ stains.transpose(1, 2)  # least squares
        concentration = density @ pseudo.transpose(1, 2)  # (N, P, 2)
        top = 1 + (99 * (n_pixels - 1) + 50) // 100  # _percentile_index(99, n_pixels), 1-based, on the host
        peak = _kth_smallest(concentration, top)  # (N, 2)
        concentration = concentration * (self.max_concentration / peak.clamp(min=1e-6))[:, None, :]
        out = (IO * torch.exp(-concentration @ self.stain_matrix.T)).clamp(max=255) / 255
        usable = (count >= MIN_TISSUE * n_pixels) & (determinant > 1e-8) & (peak > 1e-6).all(1)
        usable = usable & torch.isfinite(out).all(dim=(1, 2)) & self.fitted
        return torch.where(usable[:, None, None], out.nan_to_num(), pixels)


_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])  # sRGB (D65), as torchstain
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> CIE L*a*b* (L in 0..100), torchstain's constants."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4, rgb / 12.92)
    xyz = linear @ device_constant("rgb_to_xyz_t", _RGB_TO_XYZ.T, rgb.device) / device_constant("white", _WHITE, rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([lab[..., 1] / 500 + fy, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * device_constant("white", _WHITE, lab.device)
    linear = xyz @ device_constant("xyz_to_rgb_t", _XYZ_TO_RGB.T, lab.device)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


class Reinhard(nn.Module):
    """Reinhard et al., 2001: each image's L*a*b* channel means and deviations moved to the
    reference's."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lab_mean", torch.zeros(3))
        self.register_buffer("lab_std", torch.ones(3))
        self.register_buffer("fitted", torch.tensor(False))  # unfitted: images pass unchanged

    def fit(self, montage: torch.Tensor) -> None:
        from torchstain.torch.normalizers import TorchReinhardNormalizer
        fitted = TorchReinhardNormalizer()
        fitted.fit(montage.permute(2, 0, 1))
        self.lab_mean.copy_(fitted.target_means)
        self.lab_std.copy_(fitted.target_stds)
        self.fitted.fill_(True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, P, 3) float in [0, 1] -> the same, normalised. A frame without colour (a* and b*
        spread under CHROMA_FLOOR: grey frames, blank glass, empty slots) passes unchanged, and no
        channel's spread is scaled up more than 1 / STD_FLOOR times, so rounding noise is never
        blown up into colour."""
        lab = rgb_to_lab(pixels)
        mean, std = lab.mean(1, keepdim=True), lab.std(1, keepdim=True)
        out = lab_to_rgb((lab - mean) / torch.maximum(std, STD_FLOOR * self.lab_std) * self.lab_std + self.lab_mean)
        coloured = (std[..., 1:] > CHROMA_FLOOR).any(-1, keepdim=True)
        return torch.where(coloured & self.fitted, out, pixels)


# Reinhard: a* / b* spread (L*a*b* units; 1 is about a just noticeable difference) below which a
# frame has no colour to normalise, and the least spread, relative to the reference's, that a
# channel is taken to have (at most 10x amplification).
CHROMA_FLOOR, STD_FLOOR = 0.5, 0.1


STAIN_NORMALISERS = {"macenko": Macenko, "reinhard": Reinhard}  # --stain-norm names; 'none' adds nothing


def stain_normaliser(name: str) -> nn.Module | None:
    return None if name == "none" else STAIN_NORMALISERS[name]()


def fit_montage(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 images side by side as one (H, N*W, 3) uint8 tensor (torchstain fits
    one image)."""
    return torch.from_numpy(np.concatenate(list(images), axis=1))


def fit_rows(train_rows: np.ndarray, seed: int, count: int = STAIN_FIT_IMAGES) -> np.ndarray:
    """Which training images the reference is fitted on: `count` of them, drawn with the fold's
    seed, in cache order (the same rows whatever the test fold holds)."""
    rows = np.unique(train_rows)
    if len(rows) > count:
        rows = np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
    return rows


def fold_reference(name: str, source, train, seed: int) -> dict | None:
    """The stain reference of one outer fold, fitted on STAIN_FIT_IMAGES images of its training
    patients (`train`: preprocess.dataset.PatientImages) and nothing else; a normaliser's
    state_dict, or None for 'none'."""
    if name == "none":
        return None
    rows = fit_rows(np.concatenate([r for per_mag in train.rows for r in per_mag]), seed)
    images, _ = source.gather(rows[:, None])  # (n, 1, H, W, 3) uint8
    normaliser = stain_normaliser(name)
    normaliser.fit(fit_montage(images[:, 0].cpu().numpy()))
    return normaliser.state_dict()
