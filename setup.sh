#!/usr/bin/env bash
# Install MMNet-BreakHis into the active Python. Safe to run twice.
# - A torch is already importable (a RunPod image ships one): install requirements.runpod and
#   never touch torch.
# - An NVIDIA GPU is present but torch cannot use it: stop and say why; install nothing.
# - No torch and no GPU (laptop, CPU box, CI): install requirements.txt (pinned torch pair).
set -uo pipefail
cd "$(dirname "$0")" || exit 1
PY=${PYTHON:-$(command -v python || command -v python3)}
fail() { echo "setup.sh: $*" >&2; exit 1; }

[ -n "$PY" ] || fail "no python found on PATH; install Python 3.9+ first"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || fail "Python 3.9+ needed, found $("$PY" -V 2>&1)"

# The torch a pod image ships is served from 2.1 on, and refused below it before pip runs.
TORCH_FLOOR=2.1
torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
version_below() { "$PY" -c "import sys; v = tuple(int(x) for x in '$1'.split('.')[:2]); sys.exit(0 if v < $2 else 1)"; }
if [ -n "$torch_version" ] && version_below "$torch_version" "(2, 1)"; then
    fail "torch $torch_version found, below the supported floor torch $TORCH_FLOOR: use a pod image with torch $TORCH_FLOOR or newer (RunPod's PyTorch 2.1+ templates), or install torch>=$TORCH_FLOOR with its matching torchvision, then rerun; nothing was installed"
fi
pins=()  # torch before 2.3 was compiled against NumPy 1: keep NumPy 1 and the builds made for it
if [ -n "$torch_version" ] && version_below "$torch_version" "(2, 3)"; then
    pins=(-c constraints-numpy1.txt)
fi

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 || compgen -G "/dev/nvidia[0-9]*" >/dev/null; }
torch_state=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "no-cuda")' 2>/dev/null || echo "none")

if gpu_present && [ "$torch_state" != "cuda" ]; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    driver_cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n 1 | cut -d' ' -f3)
    torch_desc=$("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda or "none (a CPU build)")' 2>/dev/null || echo "no torch installed")
    fail "an NVIDIA GPU is present (driver ${driver:-unknown}, supports CUDA ${driver_cuda:-unknown}) but torch cannot use it (${torch_desc}). Use a pod image whose CUDA is at most ${driver_cuda:-what the driver supports}, or install the torch and torchvision builds for that CUDA version, then rerun; nothing was installed"
fi

if [ "$torch_state" != "none" ]; then
    "$PY" -c 'import torchvision' 2>/dev/null \
        || fail "torch found without torchvision: install the torchvision build that matches torch $("$PY" -c 'import torch; print(torch.__version__)'), then rerun"
    echo "setup.sh: torch $torch_version found ($torch_state), installing requirements.runpod (torch untouched${pins:+, NumPy 1 pins})"
    "$PY" -m pip install -q -r requirements.runpod "${pins[@]}" || fail "pip install -r requirements.runpod failed (see above)"
else
    echo "setup.sh: no torch and no GPU, installing requirements.txt (pinned CPU-capable torch)"
    "$PY" -m pip install -q -r requirements.txt || fail "pip install -r requirements.txt failed (see above)"
fi

"$PY" - <<'PYEOF' || fail "installed packages do not import (see above)"
import importlib.metadata as md, os, shutil, torch, torchvision, timm, pytorch_grad_cam, cv2, sklearn, pandas
import numpy as np
from utils.device import grad_scaler
# What the run needs of this torch, probed: NumPy interop (a torch built for NumPy 1 fails here
# under NumPy 2), the loss scaler, one forward and backward step on the device.
torch.from_numpy(np.zeros(2))
probe = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
grad_scaler(probe, enabled=probe == "cuda")
weights = torch.ones(3, device=probe, requires_grad=True)
(weights * torch.arange(3.0, device=probe)).sum().backward()
assert weights.grad is not None, "no gradient on " + probe
opencv = [d for d in ("opencv-python", "opencv-contrib-python") if any(
    x.metadata["Name"] == d for x in md.distributions())]
if opencv:
    print(f"warning: {', '.join(opencv)} installed beside opencv-python-headless; "
          f"uninstall it: two OpenCV builds clash")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    device = (f"cuda: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor} ({'bf16' if p.major >= 8 else 'fp16 + loss scaling'})")
elif torch.backends.mps.is_available():
    device = "mps (Apple GPU)"
else:
    device = "cpu only (fine for --dry-run; a GPU is needed for the full study)"
shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.exists("/dev/shm") else 0
free = shutil.disk_usage(".").free / 2**30
print(f"device: {device}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), torchvision {torchvision.__version__}, timm {timm.__version__}")
print(f"/dev/shm: {shm:.1f} GiB, free disk here: {free:.0f} GiB")
if os.path.isdir("/workspace") and not os.path.abspath(".").startswith("/workspace"):
    print("note: /workspace (the pod's persistent volume) exists; outputs go to /workspace/mmnet-breakhis/output")
if free < 12:
    print("warning: less than 12 GiB free; the default study needs about 10 GiB (--keep-models mmnet: about 3)")
if 0 < shm < 1:
    print("warning: /dev/shm under 1 GiB: decode workers are limited to 2 (start the container with --shm-size=8g)")
PYEOF
echo "setup.sh: done. Next: python main.py --dry-run"
