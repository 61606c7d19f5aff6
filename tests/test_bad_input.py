"""Every kind of bad input ends in a one-line actionable message or a reported skip."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import config
from preprocess.dataset import fold_split
from preprocess.preprocess import build_cache, index_dataset
from tests.conftest import ROOT


def _main(*argv, timeout=180):
    result = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    return result.returncode, result.stderr.strip().splitlines(), result.stdout + result.stderr


def test_grayscale_and_rgba_pngs_are_converted_and_reported(demo_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(demo_tree, tree)
    pngs = sorted(tree.rglob("*.png"))
    Image.open(pngs[0]).convert("L").save(pngs[0])
    Image.open(pngs[1]).convert("RGBA").save(pngs[1])
    index, issues = index_dataset(tree)
    converted = issues[issues["kind"] == "converted_mode"]
    assert len(converted) == 2 and set(converted["detail"]) == {"mode L converted to RGB", "mode RGBA converted to RGB"}
    cache, ok = build_cache(index, tree, tmp_path / "cache", 32)
    assert ok.all() and cache.shape[-1] == 3
    row = index.index[index["path"] == str(pngs[0].relative_to(tree))][0]
    assert np.array_equal(cache[row][..., 0], cache[row][..., 2])  # grey stays grey


def test_patient_missing_a_magnification(demo_index):
    from preprocess.dataset import left_out_patients
    from preprocess.splits import build_folds
    from tests.conftest import tiny_config

    victim = demo_index["patient"].iloc[0]
    index = demo_index[~((demo_index["patient"] == victim) & (demo_index["mag"] == 40))].reset_index(drop=True)
    folds = build_folds(index, 2, 42, 0.2)
    fold = int(folds.loc[folds["patient"] == victim, "fold"].iloc[0])
    usable = np.ones(len(index), dtype=bool)
    single_cfg = config.experiment_config(tiny_config("."), "single_40x")
    single = fold_split(index, usable, folds, fold, single_cfg)
    assert victim not in single["test"].patients
    # said once per experiment when the study starts, naming the patient
    assert left_out_patients(index, usable, list(folds["patient"]), single_cfg) == [victim]
    assert left_out_patients(index, usable, list(folds["patient"]), tiny_config(".")) == []
    mmnet = fold_split(index, usable, folds, fold, tiny_config("."))
    position = mmnet["test"].patients.index(victim)
    assert len(mmnet["test"].rows[position][0]) == 0 and len(mmnet["test"].rows[position][1]) == 3


def test_class_with_fewer_slide_groups_than_folds(demo_tree, tmp_path):
    code, err, _ = _main("--analyze-only", "--data-dir", str(demo_tree), "--output-dir", str(tmp_path), "--folds", "8")
    assert code == 2 and len(err) == 1
    assert "class benign has 7 slide group(s) but 8 folds" in err[0] and "lower --folds" in err[0]


def test_unwritable_output_directory(tmp_path, demo_tree):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err, _ = _main("--analyze-only", "--data-dir", str(demo_tree), "--output-dir", str(blocker / "out"))
    assert code == 2 and len(err) == 1 and "not writable" in err[0] and "--output-dir" in err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "-3"], "[CFG003] epochs: must be >= 1"),
    (["--experiments", "mmnet,transformer"], "[CFG005] experiments: unknown experiment or group 'transformer'"),
    (["--backbone", "resnet999"], "[CFG006] backbone: unknown timm backbone 'resnet999'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_invalid_cli_values(argv, expected, tmp_path):
    code, err, everything = _main(*argv, "--output-dir", str(tmp_path))
    assert code == 2 and len(err) == 1 and expected in err[0]
    assert "Traceback" not in everything


def test_small_shm_lowers_decode_workers(monkeypatch):
    import utils.env as env_module
    from config import Config
    from utils.device import detect_env

    monkeypatch.setattr(env_module, "shm_gb", lambda: 0.0625)
    monkeypatch.setattr(env_module, "usable_cpus", lambda: 16)
    env = detect_env(Config(device="cpu"))
    assert env.workers == 2 and "shm-size" in env.notes[0]
    monkeypatch.setattr(env_module, "shm_gb", lambda: 32.0)
    assert detect_env(Config(device="cpu")).workers == 16  # every core of a 16-core pod
