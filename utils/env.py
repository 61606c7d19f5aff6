"""Facts about the machine and the code for the run header and setup checks."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from config import PROJECT_ROOT


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


def shm_gb() -> float:
    return round(shutil.disk_usage("/dev/shm").total / 2**30, 2) if Path("/dev/shm").exists() else 0.0


def versions() -> dict:
    import numpy
    import timm
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "timm": timm.__version__, "numpy": numpy.__version__,
             "cuda": torch.version.cuda or "none", "platform": platform.platform()}
    try:
        import pytorch_grad_cam  # noqa: F401
        from importlib.metadata import version
        facts["grad-cam"] = version("grad-cam")
    except Exception:  # grad-cam is optional for training
        facts["grad-cam"] = "missing"
    return facts


def gpu_facts() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpus": 0}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    return {"gpus": len(names), "gpu_names": names,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}"}


def runpod_hint(output_dir: str | Path) -> str:
    """A warning when a pod's persistent volume exists but outputs would not land on it."""
    workspace = Path("/workspace")
    if workspace.is_dir() and workspace not in Path(output_dir).resolve().parents:
        return (f"/workspace exists but outputs go to {Path(output_dir).resolve()}: they are lost "
                f"when the pod stops; pass --output-dir /workspace/output to keep them")
    return ""


def configure_backends(device: str, deterministic: bool) -> str:
    """Fast GPU settings (TF32, cuDNN autotuning) or deterministic ones; says which, honestly."""
    import os

    import torch

    if device != "cuda":
        return "deterministic: same seed and thread count give identical results on this device"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        return ("deterministic GPU kernels requested (--deterministic): slower; kernels without a "
                "deterministic version warn in the log")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return ("NOT bitwise deterministic on GPU: cuDNN autotuning may pick other convolution algorithms "
            "per run, and the backward of index gathers and fused AdamW use atomic adds; expect "
            "differences in the last digits between runs (use --deterministic to trade speed for it)")
