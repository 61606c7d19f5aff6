"""Shared fixtures: offline, headless, a small synthetic BreakHis tree, the shared reference data."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist workers share the cores: torch's OpenMP threads spin while they wait, so two workers
# with a thread per core each run several times slower than with the cores divided between them.
# Set before torch is imported; subprocesses (main.py runs) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "breakhis"
LISTING = SHARED / "listings" / "breakhis_full_listing_derived.csv"
GENUINE = SHARED / "genuine"
# Demo tiles at a quarter of 700x460: the same aspect, four times faster to write.
DEMO_W, DEMO_H = 176, 116


@pytest.fixture(scope="session")
def listing():
    if not LISTING.is_file():
        pytest.skip("../shared/breakhis listing not available")
    import pandas as pd

    return pd.read_csv(LISTING, dtype={"slide_id_numeric": str, "slide_id": str})


@pytest.fixture(scope="session")
def genuine_dir():
    if not GENUINE.is_dir():
        pytest.skip("../shared/breakhis/genuine not available")
    return GENUINE


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory):
    """16 synthetic patients x 4 magnifications x 3 images, real folder and name grammar."""
    from preprocess.demo import write_demo_tree

    return write_demo_tree(tmp_path_factory.mktemp("demo"), width=DEMO_W, height=DEMO_H)


@pytest.fixture(scope="session")
def demo_index(demo_tree):
    from preprocess.preprocess import index_dataset

    index, _ = index_dataset(demo_tree)
    return index


def tiny_config(output_dir, **overrides):
    """A config small enough to train in seconds on a CPU core."""
    from config import Config

    values = dict(output_dir=str(output_dir), cache_dir=str(Path(output_dir) / "cache"), backbone="test_resnet",
                  pretrained="off", image_size=48,
                  feature_dim=32, epochs=2, patience=5, batch_size=8, tuples_per_epoch=32, folds=2,
                  device="cpu", workers=1, amp="none", checkpoint_minutes=0.0)
    values.update(overrides)
    return Config(**values)


def tiny_study(cfg, demo_tree, demo_index):
    """Everything run_fold needs (a Study with its images attached), built as the study builds it."""
    from preprocess.prepared import Study, attach_images
    from preprocess.splits import build_folds
    from utils.device import detect_env

    folds = build_folds(demo_index, cfg.folds, cfg.seed, cfg.inner_val_fraction)
    prepared = Study(index=demo_index, folds=folds, data_dir=demo_tree, demo=True, magnifications=cfg.magnifications)
    return attach_images(cfg, prepared, detect_env(cfg))


def _in_worker(cfg, prepared, probe, queue):
    import multiprocessing

    import utils.study.parallel as parallel

    slots = multiprocessing.get_context("spawn").Queue()
    slots.put(0)
    parallel._init_worker(cfg, prepared, slots, str(cfg.output_dir) + "/w.log", 1)
    queue.put(probe(parallel._WORKER["study"]))


def in_spawned_worker(cfg, demo_tree, demo_index, probe, timeout: int = 300):
    """What probe(study) returns inside a spawned worker set up as --jobs N sets one up (probe:
    a module-level function, so the child can import it)."""
    import dataclasses
    import multiprocessing

    study = tiny_study(cfg, demo_tree, demo_index)  # builds the cache the worker maps
    prepared = dataclasses.replace(study, env=None, source=None, usable=None)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_in_worker, args=(cfg, prepared, probe, queue))
    process.start()
    value = queue.get(timeout=timeout)
    process.join(timeout=60)
    assert process.exitcode == 0
    return value


def model_inputs(cfg, batch=3, size=64, seed=0):
    """A model's inputs (x, mask), drawn from seed: tuples (one slot per magnification), or bags
    of 5 images for MIL models, whose mask holds each image's magnification code (1..4)."""
    import torch  # imported where used, as the other helpers here import what they need

    bag = cfg.sample_mode == "bag"
    slots = 1 if cfg.model == "single" else 5 if bag else len(cfg.magnifications)
    torch.manual_seed(seed)
    x = torch.randn(batch, slots, 3, size, size)
    mask = torch.tensor([[1.0, 2, 3, 4, 2]] * batch) if bag else torch.ones(batch, slots)
    if slots > 1:
        mask[0, 0] = 0  # sample 0 lacks its lowest magnification (MIL: its first slot is empty)
    return x, mask
