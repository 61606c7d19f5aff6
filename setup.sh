#!/usr/bin/env bash
# Install MMNet-BreakHis into the active Python. Safe to run twice.
# - A CUDA torch is already importable (RunPod image): install requirements.runpod, never touch torch.
# - Anywhere else: install requirements.txt (pinned CPU-capable torch/torchvision pair).
set -uo pipefail
cd "$(dirname "$0")" || exit 1
PY=${PYTHON:-$(command -v python || command -v python3)}
fail() { echo "setup.sh: $*" >&2; exit 1; }

[ -n "$PY" ] || fail "no python found on PATH; install Python 3.9+ first"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || fail "Python 3.9+ needed, found $("$PY" -V 2>&1)"

if "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    "$PY" -c 'import torchvision' 2>/dev/null \
        || fail "CUDA torch found without torchvision: install the torchvision build that matches $("$PY" -c 'import torch; print(torch.__version__)'), then rerun"
    echo "setup.sh: CUDA torch found, installing requirements.runpod (torch untouched)"
    "$PY" -m pip install -q -r requirements.runpod || fail "pip install -r requirements.runpod failed (see above)"
else
    echo "setup.sh: no CUDA torch, installing requirements.txt"
    "$PY" -m pip install -q -r requirements.txt || fail "pip install -r requirements.txt failed (see above)"
fi

"$PY" - <<'PYEOF' || fail "installed packages do not import (see above)"
import importlib.metadata as md, shutil, torch, torchvision, timm, pytorch_grad_cam, cv2, sklearn, pandas
opencv = [d for d in ("opencv-python", "opencv-contrib-python") if any(
    x.metadata["Name"] == d for x in md.distributions())]
if opencv:
    print(f"warning: {', '.join(opencv)} installed beside opencv-python-headless; "
          f"uninstall it: two OpenCV builds clash")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    device = f"cuda: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB"
elif torch.backends.mps.is_available():
    device = "mps (Apple GPU)"
else:
    device = "cpu only (fine for --dry-run; a GPU is needed for the full study)"
shm = shutil.disk_usage("/dev/shm").total / 2**30 if __import__("os").path.exists("/dev/shm") else 0
free = shutil.disk_usage(".").free / 2**30
print(f"device: {device}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), torchvision {torchvision.__version__}, timm {timm.__version__}")
print(f"/dev/shm: {shm:.1f} GiB, free disk here: {free:.0f} GiB")
if free < 12:
    print("warning: less than 12 GiB free; the default study needs about 10 GiB (--keep-models mmnet: about 3)")
PYEOF
echo "setup.sh: done. Next: python main.py --dry-run"
