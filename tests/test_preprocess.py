"""File-name grammar, indexing and validation."""
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from preprocess.preprocess import index_dataset, parse_name, write_issues
from tests.conftest import ROOT


def test_parser_recovers_every_real_name(listing):
    assert len(listing) == 7909
    parsed = [parse_name(name) for name in listing["filename"]]
    assert all(p is not None for p in parsed)
    frame = pd.DataFrame(parsed)
    assert (frame["tumor_class"] == listing["tumor_class"]).all()
    assert (frame["subtype"] == listing["tumor_code"]).all()
    assert (frame["mag"] == listing["mag"]).all()
    assert (frame["slide_id"] == listing["slide_id"]).all()
    assert (frame["group"] == listing["slide_id_numeric"]).all()
    assert (frame["patient"] == listing["patient_dir"]).all()
    assert frame["patient"].nunique() == 82 and frame["group"].nunique() == 70


def test_parser_rejects_bad_names():
    for name in ("SOB_B_A-14-22549AB-50-001.png", "SOB_X_A-14-1-40-001.png", "image.png",
                 "SOB_B_A-14-22549AB-40-001.gif"):
        assert parse_name(name) is None


def test_parser_reads_jpeg_and_tiff_copies():
    """Re-encoded copies of the dataset keep the official names with another suffix."""
    png = parse_name("SOB_B_A-14-22549AB-40-001.png")
    for suffix in ("jpg", "JPEG", "tif", "tiff"):
        assert parse_name(f"SOB_B_A-14-22549AB-40-001.{suffix}") == png


def test_index_of_genuine_images(genuine_dir):
    index, issues = index_dataset(genuine_dir, workers=1)
    assert len(index) == 20 and index["patient"].nunique() == 13
    # Class and magnification read independently from the folder names of the official layout.
    paths = [Path(p).parts for p in index["path"]]
    by_folder = pd.DataFrame({"tumor_class": [p[3] for p in paths],
                              "mag": [int(p[-2].rstrip("X")) for p in paths]})
    assert by_folder.value_counts().sort_index().equals(
        index[["tumor_class", "mag"]].value_counts().sort_index())
    assert not issues["kind"].isin(["unreadable", "bad_name", "unexpected_size"]).any()
    assert {"count_differs", "missing_magnification"} <= set(issues["kind"])


def _broken_copy(demo_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(demo_tree, tree)
    good = sorted(tree.rglob("*.png"))
    folder = good[0].parent
    (folder / "SOB_B_A-14-22549AB-40-901.png").write_bytes(b"")  # zero bytes
    data = good[1].read_bytes()
    (folder / "SOB_B_A-14-22549AB-40-902.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "SOB_B_A-14-22549AB-40-903.png").write_text("not an image")  # text named .png
    shutil.copy(good[2], folder / "holiday_photo.png")  # does not follow the grammar
    (folder / "notes.docx").write_text("x")  # not a PNG at all
    return tree, len(good)


def test_broken_files_are_reported_and_skipped(demo_tree, tmp_path):
    tree, n_good = _broken_copy(demo_tree, tmp_path)
    index, issues = index_dataset(tree, workers=2)
    assert len(index) == n_good  # every good file processed, no broken one kept
    csv = pd.read_csv(write_issues(issues, tmp_path / "out"))
    kinds = dict(zip(csv["path"].map(lambda p: Path(str(p)).name), csv["kind"]))
    for name in ("SOB_B_A-14-22549AB-40-901.png", "SOB_B_A-14-22549AB-40-902.png",
                 "SOB_B_A-14-22549AB-40-903.png"):
        assert kinds[name] == "unreadable"
    assert kinds["holiday_photo.png"] == "bad_name"
    assert kinds["notes.docx"] == "not_image"


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_data_dir_exits_2(tmp_path, make):
    data = tmp_path / "data"
    if make == "empty":
        data.mkdir()
    result = subprocess.run([sys.executable, "main.py", "--data-dir", str(data), "--output-dir",
                             str(tmp_path / "out"), "--analyze-only"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "extract BreaKHis_v1" in last and "--dry-run" in last
    assert "Traceback" not in result.stderr


def test_images_are_checked_once_until_they_change(tmp_path, monkeypatch):
    """A second index of the same files reads none of them again; a file that changed (size or
    modification time) is checked again, and a corrupt one is still found."""
    import os

    import preprocess.preprocess as prep
    from preprocess.demo import write_demo_tree

    tree = write_demo_tree(tmp_path / "tree", patients=2, images_per_mag=1, width=88, height=58)
    memo, opened = tmp_path / "cache" / "checked_images.json", []
    real = prep.check_image
    monkeypatch.setattr(prep, "check_image", lambda path: opened.append(path) or real(path))
    first, _ = prep.index_dataset(tree, checked=memo)
    assert len(opened) == len(first) == 8 and memo.is_file()
    opened.clear()
    again, _ = prep.index_dataset(tree, checked=memo)
    assert opened == [] and again.equals(first)
    broken = tree / first["path"].iloc[0]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated: another size
    os.utime(broken, ns=(1, 1))
    third, issues = prep.index_dataset(tree, checked=memo)
    assert opened == [str(broken)] and len(third) == 7
    assert issues.loc[issues["kind"] == "unreadable", "path"].tolist() == [first["path"].iloc[0]]
