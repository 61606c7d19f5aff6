#!/usr/bin/env bash
# The prepared GPU check, for a machine with one CUDA GPU (about 8 minutes there):
#   bash tests/gpu_check.sh OUT_DIR
# runs setup.sh, the tests marked gpu (bf16 autocast, the device-resident cache, no host sync in
# a step under torch.cuda.set_sync_debug_mode("error"), the out-of-memory back-off, a spawned
# worker), a one-epoch study on synthetic data at 224 px, and the benchmark; writes
# OUT_DIR/gpu_check.json (and each part's log beside it). Without CUDA it says so in one line.
set -uo pipefail
out=${1:?usage: bash tests/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked; the CPU suite covers the same code"
  echo '{"gpu": false}' > "$out/gpu_check.json"
  exit 0
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name $? $((SECONDS - started))" >> "$out/parts.txt"
}
: > "$out/parts.txt"
part setup 120 bash setup.sh
part gpu_tests 150 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py --junitxml "$out/gpu_tests.xml"
part study 150 "$PYTHON" main.py --dry-run --epochs 1 --image-size 224 --backbone resnet18 --device cuda \
  --output-dir "$out/study" --report-file "$out/study/R.md" --no-live-report
part benchmark 60 "$PYTHON" -m utils.benchmark --device cuda --batches 4 --output-dir "$out/benchmark"

"$PYTHON" - "$out" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd
import torch

out = Path(sys.argv[1])
parts = {name: {"rc": int(rc), "seconds": int(s)} for name, rc, s in
         (line.split() for line in (out / "parts.txt").read_text().splitlines())}
result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": parts}
bench = out / "benchmark" / "tables" / "benchmark.csv"
if bench.is_file():
    result["benchmark"] = pd.read_csv(bench).set_index("metric")["value"].to_dict()
timing = out / "study" / "tables" / "timing.csv"
if timing.is_file():
    result["study_train_minutes"] = pd.read_csv(timing).set_index("experiment")["train_minutes"].to_dict()
result["passed"] = all(p["rc"] == 0 for p in parts.values())
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'} on {result['gpu']} -> {out / 'gpu_check.json'}")
PY
