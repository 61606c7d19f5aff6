"""A folder of one patient's images, as predict.py and an external cohort read it: decoded in
parallel threads into a small cache, each file's magnification from its BreakHis name or a
40X/100X/200X/400X folder above it, unusable files listed with the reason."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from preprocess.preprocess import IMAGE_SUFFIXES, decode_resized, frame_shape, parse_name

MAG_FOLDER = re.compile(r"(40|100|200|400)x", re.IGNORECASE)
BREAKHIS_PATIENT = re.compile(r"SOB_([BM])_([A-Z]+)_\d+-([0-9A-Za-z]+)")  # SOB_B_A_14-22549AB
LABEL_WORDS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "b": 0, "m": 1}


def magnification_of(path: Path, root: Path) -> int | None:
    fields = parse_name(path.stem + ".png")  # the grammar holds for re-encoded copies too
    if fields:
        return fields["mag"]
    for part in reversed(path.relative_to(root).parts[:-1]):
        if MAG_FOLDER.fullmatch(part):
            return int(part[:-1])
    return None


def _decoded(path: Path, size: int):
    try:
        return decode_resized(str(path), size), None
    except Exception as exc:  # unreadable file: reported, the rest still counts
        return None, f"unreadable: {type(exc).__name__}"


def _first_per_magnification(wanted: list[tuple], count: int) -> list[tuple]:
    """The first `count` of (path, rel, mag) items of each magnification, in file order."""
    seen: dict[int, int] = {}
    kept = []
    for item in wanted:
        seen[item[2]] = seen.get(item[2], 0) + 1
        if seen[item[2]] <= count:
            kept.append(item)
    return kept


def load_patient(patient_dir: Path, size: int, threads: int = 8, per_magnification: int = 0):
    """uint8 cache (N, height, width, 3), rows per magnification, skipped files with reasons.
    Images are decoded in parallel threads (PNG decoding and resizing release the GIL): a
    90-image patient is decoded in about 1/threads of the serial time. per_magnification > 0
    decodes only the first that many files of each magnification: all that the first K
    evaluation tuples read (tuple k takes image k mod n of each magnification), so
    predict.py --max-tuples K decodes no file it does not score."""
    by_mag, skipped, wanted = {}, [], []
    files = sorted(p for p in patient_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        rel = str(path.relative_to(patient_dir))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"file": rel, "reason": "not an image"})
            continue
        mag = magnification_of(path, patient_dir)
        if mag is None:
            skipped.append({"file": rel, "reason": "unknown magnification (name it like BreakHis or put it in a "
                                                  "40X/100X/200X/400X folder)"})
            continue
        wanted.append((path, rel, mag))
    if per_magnification > 0:
        wanted = _first_per_magnification(wanted, per_magnification)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(lambda item: _decoded(item[0], size), wanted))
    images = []
    for (_path, rel, mag), (image, problem) in zip(wanted, decoded):
        if image is None:
            skipped.append({"file": rel, "reason": problem})
            continue
        images.append(image)
        by_mag.setdefault(mag, []).append(len(images) - 1)
    cache = np.stack(images) if images else np.zeros((0, *frame_shape(size), 3), np.uint8)
    return cache, by_mag, skipped


def cohort_folders(root: Path, labels_csv: Path | None = None) -> tuple[list[dict], list[dict]]:
    """The patients of an external cohort under `root`: [{patient, folder, label, group}] and
    the listed patients without a folder [{patient, reason}].

    Without a labels CSV every folder named like a BreakHis patient (SOB_B_A_14-22549AB) is a
    patient and its name gives the label; with one (columns patient, label: 0/1 or
    benign/malignant) each listed patient is the folder of that name anywhere under `root`."""
    folders = sorted(p for p in Path(root).rglob("*") if p.is_dir())
    if labels_csv is None:
        patients = []
        for folder in folders:
            match = BREAKHIS_PATIENT.fullmatch(folder.name)
            if match:
                patients.append({"patient": folder.name, "folder": folder, "label": int(match.group(1) == "M"),
                                 "group": re.match(r"\d+", match.group(3)).group(0)})
        return patients, []
    table = pd.read_csv(labels_csv, dtype=str)
    if not {"patient", "label"} <= set(table.columns):
        raise ValueError(f"{labels_csv} needs the columns patient and label (0/1 or benign/malignant)")
    by_name = {folder.name: folder for folder in folders}
    patients, missing = [], []
    for patient, label in zip(table["patient"], table["label"]):
        value = LABEL_WORDS.get(str(label).strip().lower())
        if value is None:
            raise ValueError(f"{labels_csv}: label '{label}' of patient '{patient}' is not 0/1 or benign/malignant")
        if patient not in by_name:
            missing.append({"patient": patient, "reason": f"no folder named '{patient}' under {root}"})
            continue
        patients.append({"patient": patient, "folder": by_name[patient], "label": value, "group": patient})
    return patients, missing
