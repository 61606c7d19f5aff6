"""How much memory a process may still use: the container's limit before the host's figures.

A pod is a container: os.sysconf reports the host's free memory, which can be far more than
the container's cgroup allows, and a cache sized by it gets the process killed. cgroup v2
(memory.max, memory.current) and v1 (memory/memory.limit_in_bytes, memory.usage_in_bytes) are
read when present; the smaller figure wins.
"""
from __future__ import annotations

import os
from pathlib import Path

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
