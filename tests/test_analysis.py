"""Dataset analysis tables and plots."""
from pathlib import Path

import pandas as pd

from preprocess.analyze import analyze
from preprocess.preprocess import index_dataset


def test_analysis_of_genuine_images(genuine_dir, tmp_path):
    index, _ = index_dataset(genuine_dir)
    tables = analyze(index, genuine_dir, tmp_path)
    class_mag = tables["class_by_magnification"].set_index("class")
    # Counted from the folder layout, independently of the parser.
    files = [Path(p).relative_to(genuine_dir).parts for p in genuine_dir.rglob("*.png")]
    for cls in ("benign", "malignant"):
        for mag in (40, 100, 200, 400):
            expected = sum(1 for f in files if f[3] == cls and f[-2] == f"{mag}X")
            assert class_mag.loc[cls, f"{mag}X"] == expected
    assert class_mag.loc["total", "total"] == 20
    assert tables["patients_per_subtype"]["patients"].sum() == 13
    saved = pd.read_csv(tmp_path / "tables" / "class_by_magnification.csv")
    assert saved["total"].iloc[-1] == 20
    assert (tmp_path / "tables" / "patients_per_subtype.md").read_text().startswith("| tumor_class")
    for plot in ("class_magnification_bars", "subtype_distribution",
                 "patient_magnification_heatmap", "sample_grid"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000


def test_images_per_patient_min_median_max(demo_index):
    from preprocess.analyze import analysis_tables

    table = analysis_tables(demo_index)["images_per_patient_magnification"].set_index("magnification")
    assert (table[["min", "median", "max"]] == 3).all().all()
