"""Facts about the machine and the code, without torch: paths, cores, /dev/shm, disk, commit.

Torch-free on purpose: config, the analysis and the report import it and must start without
loading torch. Device facts that need torch live in utils/device.py.
"""
from __future__ import annotations

import hashlib
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
    """Processes for PNG checks and decoding: the request, else every usable core (decoding is
    CPU-bound and done once per study; a 16-core pod decodes twice as fast as with 8), and 2 at
    most on a small /dev/shm. Returns the count and notes for the run header."""
    if requested:
        return requested, []
    workers = max(1, usable_cpus())
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


CODE_SUFFIXES = (".py", ".sh", ".txt", ".yaml", ".runpod")  # what a job runs or installs


def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """SHA-256 (16 hex) of the project's code as this process sees it: every file with a code
    suffix, by relative path and content, outside hidden folders and the output and data
    folders. Equal on two machines means the same code, committed or not (a git commit would
    not see uncommitted edits, and a shipped copy has no .git)."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if not (d.startswith(".") or d == "__pycache__"
                                                             or (here == root and d in ("output", "data"))))
        for name in sorted(f for f in files if f.endswith(CODE_SUFFIXES)):
            relative = (here / name).relative_to(root).as_posix()
            digest.update(relative.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


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


# Memory a process may still use: the container's limit before the host's figures. A pod is a
# container: os.sysconf reports the host's free memory, which can be far more than the
# container's cgroup allows, and a cache sized by it gets the process killed. cgroup v2
# (memory.max, memory.current) and v1 (memory/memory.limit_in_bytes, memory.usage_in_bytes) are
# read when present; the smaller figure wins.
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes a near-2^63 number for "no limit"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def container_memory_left(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes the container may still allocate, or None without a limit (or outside a cgroup)."""
    for limit_file, usage_file in ((root / "memory.max", root / "memory.current"),
                                   (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < _UNLIMITED:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def host_memory_free() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(root: Path = CGROUP_ROOT) -> int:
    """Bytes of RAM this process may still use: the container's allowance, within the host's."""
    left = container_memory_left(root)
    return min(host_memory_free(), left) if left is not None else host_memory_free()
