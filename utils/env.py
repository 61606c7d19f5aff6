"""Facts about the machine and the code, without torch: paths, cores, /dev/shm, disk, commit.

Torch-free on purpose: config, the analysis and the report import it and must start without
loading torch. Device facts that need torch live in utils/device.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNPOD_VOLUME = Path("/workspace")  # RunPod's persistent volume: survives a pod stop


def get_base_path() -> Path:
    """Where outputs and caches belong: the project folder when it lies on the pod's persistent
    volume (RunPod mounts it at /workspace) or there is none, else a folder on that volume."""
    on_volume = RUNPOD_VOLUME.is_dir() and os.access(RUNPOD_VOLUME, os.W_OK)
    if not on_volume or RUNPOD_VOLUME in PROJECT_ROOT.parents:
        return PROJECT_ROOT
    return RUNPOD_VOLUME / "mmnet-breakhis"


def keep_hub_cache_on_volume() -> None:
    """Downloaded weights go to the persistent volume, so a restarted pod does not fetch them
    again (unless the user chose a cache place)."""
    if RUNPOD_VOLUME.is_dir() and os.access(RUNPOD_VOLUME, os.W_OK):
        os.environ.setdefault("HF_HOME", str(RUNPOD_VOLUME / ".cache" / "huggingface"))
        os.environ.setdefault("TORCH_HOME", str(RUNPOD_VOLUME / ".cache" / "torch"))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def shm_gb() -> float:
    """Size of /dev/shm in GB; infinity where there is none (macOS: no such limit)."""
    return shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else float("inf")


def decode_workers(requested: int = 0) -> tuple[int, list[str]]:
    """Processes for PNG checks and decoding: the request, else usable cores capped at 8,
    and 2 at most on a small /dev/shm. Returns the count and notes for the run header."""
    if requested:
        return requested, []
    workers = max(1, min(8, usable_cpus()))
    if shm_gb() < 1.0 and workers > 2:
        # Docker's default 64 MB /dev/shm: process pools keep their queues and locks there.
        return 2, [f"/dev/shm is {shm_gb():.2f} GB: decode workers lowered to 2 "
                   f"(start the container with --shm-size=8g for more)"]
    return workers, []


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def free_disk_gb(path: str | Path) -> float:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return round(shutil.disk_usage(path).free / 2**30, 1)


def runpod_hint(output_dir: str | Path) -> str:
    """A warning when a pod's persistent volume exists but outputs would not land on it."""
    if RUNPOD_VOLUME.is_dir() and RUNPOD_VOLUME not in Path(output_dir).resolve().parents:
        return (f"/workspace exists but outputs go to {Path(output_dir).resolve()}: they are lost "
                f"when the pod stops; pass --output-dir /workspace/output to keep them")
    return ""
