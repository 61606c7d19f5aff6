"""Synthetic BreakHis-shaped data: the real folder and file-name grammar, H&E-like pictures.

The class signal is nuclear: malignant tiles carry more, larger, darker and more irregular
nuclei than benign ones. It is drawn only inside `signal_box` (fractions of width/height),
so tests can check that Grad-CAM looks where the evidence is. Usage:
    python -m preprocess.demo --out data/demo --patients 16 --images 3
    python -m preprocess.demo --out /tmp/full --from-listing listing.csv   # full-size tree
"""
from __future__ import annotations

import argparse
import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from config import MAGNIFICATIONS, SUBTYPE_NAMES
from preprocess.preprocess import parse_name
from utils.env import usable_cpus

BENIGN, MALIGNANT = ("A", "F", "PT", "TA"), ("DC", "LC", "MC", "PC")
FULL_BOX = (0.0, 0.0, 1.0, 1.0)


def relative_path(filename: str) -> str:
    """Official archive location of a BreakHis file name."""
    f = parse_name(filename)
    subtype = SUBTYPE_NAMES[f["subtype"]]
    return (f"BreaKHis_v1/histology_slides/breast/{f['tumor_class']}/SOB/{subtype}/"
            f"{f['patient']}/{f['mag']}X/{filename}")


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Eosin-pink stroma with low-frequency texture, as float RGB in [0, 255]."""
    coarse = rng.normal(0, 1, (max(2, h // 40), max(2, w // 40), 1))
    field = np.asarray(Image.fromarray(((coarse[..., 0] * 30) + 128).clip(0, 255).astype(np.uint8))
                       .resize((w, h), Image.BILINEAR), dtype=np.float32)[..., None] / 255.0
    pink = np.array([236, 178, 206], np.float32)
    pale = np.array([250, 232, 240], np.float32)
    return pink * field + pale * (1 - field) + rng.normal(0, 6, (h, w, 3))


def _draw_nuclei(draw, rng, box, count, radius, darkness, irregularity):
    x0, y0, x1, y1 = box
    for _ in range(count):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        rx = radius * rng.uniform(1 - irregularity, 1 + irregularity)
        ry = radius * rng.uniform(1 - irregularity, 1 + irregularity)
        shade = int(150 * (1 - darkness) + rng.uniform(-15, 15))
        colour = (max(0, shade - 40), max(0, shade - 70), min(255, shade + 60))  # haematoxylin
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)


def synth_image(label: int, subtype_idx: int, mag: int, seed: int, width: int = 700,
                height: int = 460, signal_box=FULL_BOX) -> Image.Image:
    """One H&E-like tile; its class evidence lies inside signal_box only."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(_background(rng, width, height).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    zoom = (mag / 40) ** 0.5
    area = width * height / 700 / 460
    # Shared background nuclei everywhere: small and regular, identical in distribution per class.
    _draw_nuclei(draw, rng, (0, 0, width, height), int(60 * area / zoom), 3 * zoom * width / 700,
                 0.4, 0.15)
    bx = (signal_box[0] * width, signal_box[1] * height, signal_box[2] * width, signal_box[3] * height)
    box_area = (bx[2] - bx[0]) * (bx[3] - bx[1]) / 700 / 460
    if label:  # malignant: crowded, enlarged, hyperchromatic, pleomorphic nuclei
        count, radius, dark, irregular = 140, 6.5, 0.85, 0.45 + 0.05 * subtype_idx
    else:  # benign: sparse, small, pale, regular
        count, radius, dark, irregular = 45, 4.0, 0.45, 0.1 + 0.05 * subtype_idx
    _draw_nuclei(draw, rng, bx, int(count * box_area / zoom), radius * zoom * width / 700,
                 dark, irregular)
    return img.filter(ImageFilter.GaussianBlur(radius=0.8))


def demo_filenames(patients: int = 16, images_per_mag: int = 3, seed: int = 0) -> list[str]:
    """BreakHis-grammar names: both classes, all 8 subtypes, 4 magnifications.

    Two benign patients share slide number 22549 (as in the real data), so the grouped folds
    are exercised; one patient has year 15 and sequences not starting at 001.
    """
    rng = np.random.default_rng(seed)
    names = []
    for p in range(patients):
        cls, codes = ("B", BENIGN) if p % 2 == 0 else ("M", MALIGNANT)
        code = codes[(p // 2) % 4]
        slide = "22549AB" if p == 0 else "22549CD" if p == 2 else str(10000 + 137 * p)
        year = 15 if p == patients - 1 else 14
        start = 1 + int(rng.integers(0, 3))
        for mag in MAGNIFICATIONS:
            names += [f"SOB_{cls}_{code}-{year}-{slide}-{mag}-{start + i:03d}.png"
                      for i in range(images_per_mag)]
    return names


def _write_one(job) -> None:
    out_dir, filename, width, height, signal_box = job
    f = parse_name(filename)
    codes = BENIGN if f["label"] == 0 else MALIGNANT
    seed = int(hashlib.md5(filename.encode()).hexdigest()[:8], 16)  # same picture every run
    img = synth_image(f["label"], codes.index(f["subtype"]), f["mag"], seed, width, height,
                      signal_box)
    path = Path(out_dir) / relative_path(filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, compress_level=1)


def write_tree(out_dir: str | Path, filenames: list[str], width: int = 700, height: int = 460,
               signal_box=FULL_BOX, workers: int = 0) -> Path:
    jobs = [(str(out_dir), n, width, height, tuple(signal_box)) for n in filenames]
    workers = workers or usable_cpus()
    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_one(job)
    return Path(out_dir)


def write_demo_tree(out_dir: str | Path, patients: int = 16, images_per_mag: int = 3,
                    width: int = 700, height: int = 460, signal_box=FULL_BOX) -> Path:
    return write_tree(out_dir, demo_filenames(patients, images_per_mag), width, height, signal_box)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic BreakHis-shaped tree.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--images", type=int, default=3, help="images per patient and magnification")
    parser.add_argument("--width", type=int, default=700)
    parser.add_argument("--height", type=int, default=460)
    parser.add_argument("--from-listing", help="CSV with a 'filename' column: mirror those names")
    args = parser.parse_args(argv)
    names = (pd.read_csv(args.from_listing)["filename"].tolist() if args.from_listing
             else demo_filenames(args.patients, args.images))
    write_tree(args.out, names, args.width, args.height)
    print(f"wrote {len(names)} images to {args.out}")


if __name__ == "__main__":
    main()
