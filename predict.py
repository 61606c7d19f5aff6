"""Predict one patient from a folder of PNGs and print JSON.

    python predict.py --run-dir output --patient-dir DIR [--experiment mmnet] [--cam fig.png]
    python predict.py --checkpoint output/runs/mmnet/fold0/best.pt --patient-dir DIR

The folder may hold any subset of the four magnifications. A file's magnification comes from
its BreakHis name, else from a 40X/100X/200X/400X folder above it. With --run-dir the fold
models vote as an ensemble (mean probability, mean threshold).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from preprocess.dataset import ImageSource, evaluation_tuples
from preprocess.preprocess import decode_resized, frame_shape, parse_name
from utils.inference import explain_tuple, fold_checkpoints, load_fold_model, patient_data, predict_patient
from utils.plottings import patient_figure

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
MAG_FOLDER = re.compile(r"(40|100|200|400)x", re.IGNORECASE)


def magnification_of(path: Path, root: Path) -> int | None:
    fields = parse_name(path.stem + ".png")  # the grammar holds for re-encoded copies too
    if fields:
        return fields["mag"]
    for part in reversed(path.relative_to(root).parts[:-1]):
        if MAG_FOLDER.fullmatch(part):
            return int(part[:-1])
    return None


def load_patient(patient_dir: Path, size: int):
    """uint8 cache (N, height, width, 3), rows per magnification, skipped files with reasons."""
    images, by_mag, skipped = [], {}, []
    files = sorted(p for p in patient_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        rel = str(path.relative_to(patient_dir))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"file": rel, "reason": "not an image"})
            continue
        mag = magnification_of(path, patient_dir)
        if mag is None:
            skipped.append({"file": rel, "reason": "unknown magnification (name it like BreakHis or put it in a 40X/100X/200X/400X folder)"})
            continue
        try:
            images.append(decode_resized(str(path), size))
        except Exception as exc:  # unreadable file: reported, the rest still counts
            skipped.append({"file": rel, "reason": f"unreadable: {type(exc).__name__}"})
            continue
        by_mag.setdefault(mag, []).append(len(images) - 1)
    cache = np.stack(images) if images else np.zeros((0, *frame_shape(size), 3), np.uint8)
    return cache, by_mag, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one fold's best.pt")
    source.add_argument("--run-dir", help="an output directory: every fold's best.pt, as an ensemble")
    parser.add_argument("--experiment", default="mmnet")
    parser.add_argument("--patient-dir", required=True)
    parser.add_argument("--cam", help="write a Grad-CAM figure of the patient's first tuple here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    patient_dir = Path(args.patient_dir)
    if not patient_dir.is_dir():
        raise FileNotFoundError(f"patient folder '{patient_dir}' does not exist")
    paths = [Path(args.checkpoint)] if args.checkpoint else fold_checkpoints(args.run_dir, args.experiment)
    if not paths or not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"no checkpoint found ({args.checkpoint or args.run_dir}); train with "
                                f"`python main.py` first or pass --checkpoint PATH")
    started = time.perf_counter()
    models = [load_fold_model(p, args.device) for p in paths]
    load_ms = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    cache, by_mag, skipped = load_patient(patient_dir, models[0].cfg.image_size)
    decode_ms = 1000 * (time.perf_counter() - started)
    if not by_mag:
        raise ValueError(f"no usable image in '{patient_dir}' ({len(skipped)} file(s) skipped): "
                         f"expected PNGs of 40X/100X/200X/400X")
    result = {"patient_dir": str(patient_dir), **predict_patient(models, cache, by_mag, args.device),
              "images_used": {f"{m}X": len(rows) for m, rows in sorted(by_mag.items())},
              "skipped": skipped, "load_ms": round(load_ms, 1), "decode_ms": round(decode_ms, 1)}
    if args.cam:
        result["cam"] = str(write_cam(models[0], cache, by_mag, Path(args.cam), args.device))
    print(json.dumps(result, indent=2))
    return 0


def write_cam(fm, cache, by_mag, path: Path, device: str) -> Path:
    tuples, _ = evaluation_tuples(patient_data(by_mag, fm.cfg))
    return patient_figure(explain_tuple(fm, ImageSource(cache, device), tuples[0], f"{path.stem} ({fm.path})"), path)


if __name__ == "__main__":
    raise SystemExit(main())
