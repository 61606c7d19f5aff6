"""One end-to-end `python main.py --dry-run` on demo data: the files it must write."""
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT


def test_dry_run_end_to_end_with_experiment_filter(tmp_path):
    out, report = tmp_path / "output", tmp_path / "RUNPOD_OUTPUT.md"
    cmd = [sys.executable, "main.py", "--dry-run", "--experiments", "mmnet,single_40x",
           "--backbone", "test_resnet", "--output-dir", str(out), "--report-file", str(report),
           "--data-dir", str(tmp_path / "no_data_here")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SYNTHETIC demo data" in result.stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["mmnet", "single_40x"]
    for fold in (0, 1):
        folder = out / "runs" / "mmnet" / f"fold{fold}"
        for name in ("history.csv", "predictions.csv", "results.json", "best.pt"):
            assert (folder / name).is_file(), folder / name
        assert not (folder / "last.pt").exists()  # a finished fold keeps only its model
    folds = pd.read_csv(out / "folds.csv", dtype={"group": str})
    assert folds["fold"].nunique() == 2 and (folds.groupby("group")["fold"].nunique() == 1).all()
    mmnet = pd.read_csv(out / "tables" / "mmnet_folds.csv")
    assert mmnet["fold"].astype(str).tolist() == ["0", "1", "mean ± sd"]
    for table in ("class_by_magnification", "data_issues", "main_comparison"):
        assert (out / "tables" / f"{table}.csv").is_file()
    assert (out / "plots" / "sample_grid.png").is_file() and (out / "plots" / "roc_mmnet.png").is_file()
    text = report.read_text()
    assert "SYNTHETIC DEMO DATA" in text and "predicted duration" in text and "mmnet fold 1 done" in text

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
