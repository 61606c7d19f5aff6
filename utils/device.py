"""The device a run trains on and its settings: detect_env(), backend switches, GPU facts, and
the seeds of every random generator (they sit beside the determinism switches)."""
from __future__ import annotations

import dataclasses
import os
import platform
import random
import types
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils.env import decode_workers


class DeviceError(ValueError):
    """The requested device cannot be used; main prints it as one line."""


@dataclass
class EnvInfo:
    device: str
    amp_dtype: str  # bfloat16 | float16 | none
    batch_size: int  # tuples per optimizer step: the config's, the same on every device
    micro_batch: int  # tuples per forward pass, from device memory
    workers: int
    device_name: str = ""
    memory_gb: float = 0.0
    notes: list = field(default_factory=list)


def _micro_batch_for(device: str, gb: float) -> int:
    # Tuples of four 224 px images through four resnet18 branches: ~0.25 GB each in bf16.
    if device == "cuda":
        return 64 if gb >= 40 else 32 if gb >= 16 else 16
    return 16 if device == "mps" else 8  # CPU: a dry-run device; small steps keep caches warm


# --jobs auto: fold jobs per GPU. Launch-bound jobs fill each other's gaps on one GPU; past a few,
# its arithmetic is the bound (an assumption until a GPU measures 1 vs 2 vs 4).
MAX_JOBS_PER_GPU = 4
JOB_FIXED_GB = 1.5  # CUDA context, model, AdamW state and workspace of one job (four resnet18: ~0.75 GB of state)
TUPLE_GB = 0.25  # activations of one training tuple of four 224 px images in bf16 (_micro_batch_for's rule)


def jobs_per_gpu_auto(memory_gb: float, job_gb: float, cores_per_gpu: int) -> tuple[int, str]:
    """(jobs, why) for one GPU: as many as 90 % of its memory holds and two cores each feed,
    at most MAX_JOBS_PER_GPU, at least 1."""
    by_memory, by_cores = int(0.9 * memory_gb // job_gb), cores_per_gpu // 2
    jobs = max(1, min(MAX_JOBS_PER_GPU, by_memory, by_cores))
    return jobs, (f"{jobs} per GPU: {memory_gb:.0f} GB holds {by_memory} job(s) of {job_gb:.1f} GB, "
                  f"{cores_per_gpu} cores feed {by_cores} (2 each), at most {MAX_JOBS_PER_GPU}")


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, else mps, else cpu; a forced device that is not there is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps requested but MPS is not available; use --device cpu")
    return device


def auto_amp(device: str) -> str:
    """bf16 only where tensor cores run it (compute capability 8.0+, Ampere on): V100, T4 and
    RTX 20xx report bf16 support through emulation, slower than fp16 with a loss scaler."""
    if device != "cuda":
        return "none"
    major, _ = torch.cuda.get_device_capability(torch.cuda.current_device())
    return "bfloat16" if major >= 8 else "float16"


def detect_env(cfg) -> EnvInfo:
    """Device, AMP dtype, batch and micro-batch, decode workers for a run with this config."""
    device = resolve_device(cfg.device)
    name, gb = device, 0.0
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        name, gb = props.name, props.total_memory / 2**30
    amp = auto_amp(device) if cfg.amp == "auto" else cfg.amp
    micro = min(cfg.batch_size, cfg.micro_batch or _micro_batch_for(device, gb))
    workers, notes = decode_workers(cfg.workers)
    return EnvInfo(device=device, amp_dtype=amp, batch_size=cfg.batch_size, micro_batch=micro,
                   workers=workers, device_name=name, memory_gb=round(gb, 1), notes=notes)


def resolved_config(cfg, env: EnvInfo):
    """The config with what depends on the device decided, so it enters the run identity:
    pretrained auto -> on where the full study trains (CUDA and MPS: the same command on a pod
    and on a Mac runs the same study) or with a weights file, off on a CPU (a dry run, tests);
    amp auto -> the dtype this device trains in."""
    pretrained = cfg.pretrained
    if pretrained == "auto":
        pretrained = "on" if env.device in ("cuda", "mps") or cfg.pretrained_file else "off"
    return dataclasses.replace(cfg, pretrained=pretrained, amp=env.amp_dtype)


def out_of_memory_error() -> type:
    """torch.OutOfMemoryError where it exists (torch >= 2.4); torch.cuda's class before that."""
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def grad_scaler(device: str, enabled: bool):
    """torch.amp.GradScaler(device) (torch >= 2.3); before that torch.cuda.amp.GradScaler, the
    only one there is (fp16 with loss scaling is a CUDA path: elsewhere it is disabled)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device == "cuda")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors that mean the same: MPS out of memory,
    cuDNN/cuBLAS workspace allocation failures."""
    if isinstance(exc, out_of_memory_error()):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def torch_release() -> tuple[int, int]:
    """(major, minor) of the torch in use: what version-dependent paths compare against."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


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
    """Fast GPU settings (TF32, cuDNN autotuning) or deterministic ones; says which, honestly.
    Called in the main process and in every worker process (spawned workers start afresh)."""
    if device != "cuda":
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
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


# ---------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) from one seed."""
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derived_seed(*parts: int) -> int:
    """A stable 63-bit seed from several integers (seed, fold, epoch...)."""
    return int(numpy.random.SeedSequence([int(p) for p in parts]).generate_state(2, numpy.uint32)
               .astype(numpy.uint64).dot([1, 2**32]) % (2**63 - 1))


class HostSyncCounter(TorchDispatchMode):
    """Counts, for every op run under it, what makes the host wait for the device or feeds the
    device from the host: scalar reads (item, bool, float of a tensor), ops whose output size
    depends on values (nonzero, masked_select, boolean-mask indexing), device-to-host copies,
    and tensors built from Python values (torch.tensor(...) inside a step copies host data to
    the device every time). On a CPU the same ops are counted, so a CPU test sees what a GPU
    step would wait on. `counts` maps each op to its number of calls; `ops` counts every
    dispatched operator (forward, backward and optimizer: each is at least one kernel launch on
    a GPU), what a launch-bound step is measured by."""

    _SCALAR = {"_local_scalar_dense", "is_nonzero", "equal"}
    _VALUE_SIZED = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                    "unique_dim", "repeat_interleave"}
    _HOST_BUILT = {"lift_fresh", "lift_fresh_copy"}

    _NO_KERNEL = {"empty", "empty_strided", "empty_like"}  # allocations: no kernel runs

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.ops = 0
        self.kernels = 0  # operators that run a kernel: views (detach, t, view, expand...) and allocations do not

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        self.kernels += not (func.is_view or name in self._NO_KERNEL)
        if not _UNCOUNTED[0] and (name in self._SCALAR or name in self._VALUE_SIZED or name in self._HOST_BUILT
                                   or _to_host(name, args, kwargs) or _bool_index(name, args)):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_UNCOUNTED = [0]  # > 0 while ops run that HostSyncCounter leaves out


def uncount_host_optimizer(optimizer) -> None:
    """Leave an optimizer's step out of HostSyncCounter when it is not the fused kernel: the
    multi-tensor AdamW of a torch without a fused kernel for this device (the CPU before 2.4)
    keeps its step counters on the host by design, and on a GPU the fused kernel runs instead."""
    if optimizer.defaults.get("fused"):
        return
    step = optimizer.step

    def uncounted_step(self, *args, **kwargs):
        _UNCOUNTED[0] += 1
        try:
            return step(*args, **kwargs)
        finally:
            _UNCOUNTED[0] -= 1

    optimizer.step = types.MethodType(uncounted_step, optimizer)  # a bound method, as LR schedulers expect


def counting_syncs(function, record):
    """`function` with each call run under a HostSyncCounter, which record(counter) then gets:
    how the benchmark and the tests count a training step or an evaluation batch."""
    def counted(*args, **kwargs):
        with HostSyncCounter() as counter:
            result = function(*args, **kwargs)
        record(counter)
        return result
    return counted


def _to_host(name: str, args, kwargs) -> bool:
    """A copy from an accelerator to the CPU (never counted on a CPU-only run)."""
    if name == "_to_copy":
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _bool_index(name: str, args) -> bool:
    """x[mask] with a boolean mask: its size depends on the mask's values (a hidden nonzero)."""
    if name not in ("index", "index_put", "index_put_"):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
