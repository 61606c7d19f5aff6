"""Index the BreakHis tree, validate every file, report what is wrong without stopping."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from config import MAGNIFICATIONS
from utils.files import atomic_write_text, steps

log = logging.getLogger(__name__)

# Matches all 7,909 official names: class, subtype code, year, slide id, magnification, sequence.
# The same names saved as JPEG or TIFF (re-encoded copies of the dataset) are read as well.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FILENAME_RE = re.compile(r"SOB_([BM])_([A-Z]+)-(\d+)-([0-9A-Za-z]+)-(40|100|200|400)-(\d+)\.(?i:png|jpe?g|tiff?)")
EXPECTED_IMAGES, EXPECTED_PATIENTS = 7909, 82
EXPECTED_SIZE = (700, 460)
METADATA_SUFFIXES = {".csv", ".txt", ".md", ".json"}  # documentation beside the images
INDEX_COLUMNS = ["path", "patient", "group", "label", "tumor_class", "subtype", "mag", "seq",
                 "year", "slide_id"]
ISSUE_COLUMNS = ["path", "kind", "detail"]


class DataError(RuntimeError):
    """The data cannot be used at all (missing or empty directory)."""


def parse_name(filename: str) -> dict | None:
    """Fields of one BreakHis file name, or None when it does not follow the grammar."""
    match = FILENAME_RE.fullmatch(filename)
    if not match:
        return None
    cls, code, year, slide, mag, seq = match.groups()
    return {
        "patient": f"SOB_{cls}_{code}_{year}-{slide}",
        # Slides such as 22549AB/22549CD share a number and probably a patient: group by it.
        "group": re.match(r"\d+", slide).group(0),
        "label": int(cls == "M"),
        "tumor_class": "malignant" if cls == "M" else "benign",
        "subtype": code, "mag": int(mag), "seq": int(seq), "year": int(year), "slide_id": slide,
    }


def missing_data_message(data_dir: str | Path) -> str:
    return (f"no BreakHis images found in '{data_dir}': extract BreaKHis_v1.tar.gz there "
            f"(or pass --data-dir DIR), or run `python main.py --dry-run` to use demo data")


def holds_images(data_dir: str | Path) -> bool:
    """Whether data_dir holds at least one image (the scan stops at the first): a cheap check
    of what the user typed, made before anything slow."""
    data_dir = Path(data_dir)
    return data_dir.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in data_dir.rglob("*"))


def scan_tree(data_dir: Path) -> tuple[list[Path], list[dict]]:
    """All image paths under data_dir (sorted) and issues for files that are not images."""
    pngs, issues = [], []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            pngs.append(path)
        elif suffix not in METADATA_SUFFIXES:
            issues.append({"path": str(path.relative_to(data_dir)), "kind": "not_image",
                           "detail": f"ignored file with suffix '{suffix or 'none'}'"})
    return pngs, issues


def check_image(path: str) -> dict:
    """Header check of one image without a full decode (cheap enough for 7,909 files); for a
    PNG it checks every chunk's CRC."""
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            img.verify()  # walks every chunk and checks its CRC: finds truncation and garbage
        return {"ok": True, "width": size[0], "height": size[1], "mode": mode, "error": ""}
    except Exception as exc:  # PIL raises many types for broken files; all mean unusable
        return {"ok": False, "width": 0, "height": 0, "mode": "", "error": f"{type(exc).__name__}: {exc}"}


def check_images(paths: list[Path], workers: int, memo: Path | None = None) -> list[dict]:
    """check_image() of every path; with `memo` (a JSON file) a file whose size and modification
    time are those of its stored check is not read again (a resume, or a second study on the
    same data, skips re-reading ~4 GB of PNGs); the memo is rewritten with every check."""
    stamps = {str(p): _stamp(p) for p in paths}
    known = json.loads(memo.read_text()) if memo is not None and memo.is_file() else {}
    todo = [n for n in stamps if known.get(n, {}).get("stamp") != stamps[n]]
    if workers <= 1 or len(todo) < 64:
        fresh = [check_image(n) for n in todo]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            fresh = list(steps(pool.map(check_image, todo, chunksize=64), "index: checking images", len(todo)))
    known.update({n: {"stamp": stamps[n], "check": c} for n, c in zip(todo, fresh)})
    if memo is not None and todo:
        atomic_write_text(memo, json.dumps({n: known[n] for n in stamps}))
    if memo is not None:
        log.info("index: %d image(s) checked, %d unchanged since their last check", len(todo), len(stamps) - len(todo))
    return [known[n]["check"] for n in stamps]


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _image_issues(rel: str, check: dict) -> list[dict]:
    if not check["ok"]:
        return [{"path": rel, "kind": "unreadable", "detail": check["error"]}]
    issues = []
    if (check["width"], check["height"]) != EXPECTED_SIZE:
        issues.append({"path": rel, "kind": "unexpected_size",
                       "detail": f"{check['width']}x{check['height']} (expected 700x460); resized"})
    if check["mode"] != "RGB":
        issues.append({"path": rel, "kind": "converted_mode",
                       "detail": f"mode {check['mode']} converted to RGB"})
    return issues


def _dataset_issues(index: pd.DataFrame) -> list[dict]:
    issues = []
    present = index.groupby("patient")["mag"].agg(set)
    for mag in MAGNIFICATIONS:  # one row per magnification that some patient lacks, not per patient
        lacking = sorted(present.index[[mag not in mags for mags in present]])
        if lacking:
            issues.append({"path": f"{mag}X", "kind": "missing_magnification",
                           "detail": f"{len(lacking)} of {len(present)} patients have no {mag}X image: {', '.join(lacking)}"})
    for group, labels in index.groupby("group")["label"]:
        if labels.nunique() > 1:
            issues.append({"path": f"group {group}", "kind": "mixed_label_group",
                           "detail": "benign and malignant slides share this slide number"})
    counts = (len(index), index["patient"].nunique())
    for what, seen, expected in (("images", counts[0], EXPECTED_IMAGES),
                                 ("patients", counts[1], EXPECTED_PATIENTS)):
        if seen != expected:
            issues.append({"path": "", "kind": "count_differs",
                           "detail": f"{seen} {what}, the full BreakHis has {expected}"})
    return issues


def index_dataset(data_dir: str | Path, workers: int = 1, check_files: bool = True,
                  checked: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table of usable images (INDEX_COLUMNS) and table of issues (ISSUE_COLUMNS); `checked`:
    check_images()'s memo of earlier checks.

    Raises DataError when the directory is missing or holds no image at all.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(missing_data_message(data_dir))
    pngs, issues = scan_tree(root)
    if not pngs:
        raise DataError(missing_data_message(data_dir))
    rows, parsed_paths = [], []
    for path in pngs:
        fields = parse_name(path.name)
        rel = str(path.relative_to(root))
        if fields is None:
            issues.append({"path": rel, "kind": "bad_name",
                           "detail": "does not match SOB_<B|M>_<code>-<yy>-<slide>-<mag>-<seq>.png (or .jpg/.tif)"})
            continue
        rows.append({"path": rel, **fields})
        parsed_paths.append(path)
    if check_files:
        keep = []
        for row, check in zip(rows, check_images(parsed_paths, workers, checked)):
            issues.extend(_image_issues(row["path"], check))
            keep.append(check["ok"])
        rows = [r for r, ok in zip(rows, keep) if ok]
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    index = index.sort_values(["patient", "mag", "seq", "path"], kind="stable").reset_index(drop=True)
    if len(index):
        issues.extend(_dataset_issues(index))
    return index, pd.DataFrame(issues, columns=ISSUE_COLUMNS)


def write_issues(issues: pd.DataFrame, output_dir: str | Path) -> Path:
    out = Path(output_dir) / "tables" / "data_issues.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    issues.to_csv(out, index=False)
    for kind, count in issues["kind"].value_counts().items():
        example = issues.loc[issues["kind"] == kind].iloc[0]
        where = f"{example['path']}: " if example["path"] else ""  # dataset-wide issues have no path
        log.warning("data issue: %d x %s (e.g. %s%s)", count, kind, where, example["detail"])
    return out


# ---------------------------------------------------------------- image cache
def frame_shape(size: int) -> tuple[int, int]:
    """(height, width) of a cached frame: the short side is `size` and the 700x460 aspect is
    kept (224 -> 224x341), so no tissue is squashed and a 180-degree turn is a valid view."""
    return size, round(size * EXPECTED_SIZE[0] / EXPECTED_SIZE[1])


def decode_resized(path: str, size: int):
    """RGB uint8 (height, width, 3) of frame_shape(size), as the model sees it. A frame of
    another size (reported by the validation) is resized to the same shape."""
    height, width = frame_shape(size)
    with Image.open(path) as img:
        img = img.convert("RGB")  # grayscale/RGBA/palette: converted (validation reports it)
        return np.asarray(img.resize((width, height), Image.BICUBIC, reducing_gap=3.0), dtype=np.uint8)


def _decode_chunk(job) -> list[tuple[int, str]]:
    """Decode rows [start, start+len(paths)) straight into the shared memory-mapped file."""
    npy_path, start, paths, size = job
    array = np.load(npy_path, mmap_mode="r+")
    failures = []
    for offset, path in enumerate(paths):
        try:
            array[start + offset] = decode_resized(path, size)
        except Exception as exc:  # any decode failure: keep a zero image, report, go on
            array[start + offset] = 0
            failures.append((start + offset, f"{type(exc).__name__}: {exc}"))
    array.flush()
    return failures


def cache_key(index: pd.DataFrame, data_dir: Path, size: int) -> str:
    files = [(p, (data_dir / p).stat().st_size) for p in index["path"]]
    return hashlib.sha256(json.dumps([size, files]).encode()).hexdigest()[:16]


def build_cache(index: pd.DataFrame, data_dir: str | Path, cache_dir: str | Path, size: int,
                workers: int = 1):
    """uint8 memmap (N, height, width, 3) of frame_shape(size) in index order and a bool mask
    of decodable rows.

    Keyed by size and file list (names and byte sizes): rebuilt only when either changes.
    """
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(index, data_dir, size)
    height, width = frame_shape(size)
    stem = f"images_{height}x{width}_{key}"
    npy, meta = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    if npy.is_file() and meta.is_file():
        ok = np.array(json.loads(meta.read_text())["ok"], dtype=bool)
        log.info("cache: reusing %s (%d images, %.2f GB)", npy.name, len(ok), npy.stat().st_size / 1e9)
        return np.load(npy, mmap_mode="r"), ok
    tmp = npy.with_suffix(".partial.npy")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(index), height, width, 3)).flush()
    paths = [str(data_dir / p) for p in index["path"]]
    step = max(16, len(paths) // (workers * 8) + 1)
    jobs = [(str(tmp), s, paths[s:s + step], size) for s in range(0, len(paths), step)]
    started = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunks = steps(pool.map(_decode_chunk, jobs), "cache: decoding images", len(jobs))
            failures = [f for chunk in chunks for f in chunk]
    else:
        failures = [f for job in steps(jobs, "cache: decoding images", len(jobs)) for f in _decode_chunk(job)]
    seconds = time.perf_counter() - started
    ok = np.ones(len(paths), dtype=bool)
    for row, error in failures:
        ok[row] = False
        log.warning("cache: skipped %s (%s)", index["path"].iloc[row], error)
    os.replace(tmp, npy)
    meta.write_text(json.dumps({"size": size, "paths": list(index["path"]), "ok": ok.tolist()}))
    log.info("cache: decoded %d images in %.1f s (%.0f images/s, %d workers) -> %s, %.2f GB",
             len(paths), seconds, len(paths) / max(seconds, 1e-9), workers, npy, npy.stat().st_size / 1e9)
    return np.load(npy, mmap_mode="r"), ok
