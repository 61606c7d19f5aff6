"""The device a run trains on and its settings: detect_env(), backend switches, GPU facts."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy
import timm
import torch

from utils.env import decode_workers


class DeviceError(ValueError):
    """The requested device cannot be used; main prints it as one line."""


@dataclass
class EnvInfo:
    device: str
    amp_dtype: str  # bfloat16 | float16 | none
    batch_size: int
    workers: int
    device_name: str = ""
    memory_gb: float = 0.0
    notes: list = field(default_factory=list)


def _batch_for_memory(gb: float) -> int:
    # Tuples of four 224 px images through four resnet18 branches: ~0.25 GB each in bf16.
    return 64 if gb >= 40 else 32 if gb >= 16 else 16


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, else mps, else cpu; a forced device that is not there is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps requested but MPS is not available; use --device cpu")
    return device


def detect_env(device: str = "auto", batch_size: int = 0, workers: int = 0) -> EnvInfo:
    device = resolve_device(device)
    name, gb, amp = device, 0.0, "none"
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        name, gb = props.name, props.total_memory / 2**30
        amp = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    auto_batch = _batch_for_memory(gb) if device == "cuda" else (16 if device == "mps" else 8)
    workers, notes = decode_workers(workers)
    return EnvInfo(device=device, amp_dtype=amp, batch_size=batch_size or auto_batch,
                   workers=workers, device_name=name, memory_gb=round(gb, 1), notes=notes)


def versions() -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "timm": timm.__version__, "numpy": numpy.__version__,
             "cuda": torch.version.cuda or "none", "platform": platform.platform()}
    try:
        facts["grad-cam"] = version("grad-cam")
    except PackageNotFoundError:  # grad-cam is optional for training
        facts["grad-cam"] = "missing"
    return facts


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"gpus": 0}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    return {"gpus": len(names), "gpu_names": names,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}"}


def configure_backends(device: str, deterministic: bool) -> str:
    """Fast GPU settings (TF32, cuDNN autotuning) or deterministic ones; says which, honestly."""
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
