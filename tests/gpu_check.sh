#!/usr/bin/env bash
# The prepared GPU check, for a machine with one CUDA GPU and no network (about 6 minutes on an
# H100-class GPU):
#   bash tests/gpu_check.sh OUT_DIR [WHEEL_DIR]
# It uses the torch it finds and installs nothing when every import succeeds. A package the
# machine lacks (grad-cam, ttach, torchstain, seaborn, tabulate, crepes: tests/gpu_check_wheels.txt
# pins them) is installed from WHEEL_DIR (default .whl/) with pip --no-index into OUT_DIR/deps,
# never into the machine's environment. Download the folder on a machine with a network:
#   pip download --no-deps -d .whl -r tests/gpu_check_wheels.txt
# Then: the tests marked gpu (bf16 autocast, the device-resident cache, no host sync in a step
# under torch.cuda.set_sync_debug_mode("error"), the out-of-memory back-off, a spawned worker),
# the benchmark (throughput eager and with --cuda-graphs, achieved TFLOP/s, dispatched operators per step and per patient),
# training throughput with 1, 2 and 4 fold jobs on the GPU at once (utils.study.jobs_rate),
# and a one-epoch study at 224 px (a fold's fixed costs in its log). Each part's result is added
# to OUT_DIR/gpu_check.json as soon as it ends, so a run cut short still returns what it measured.
# Exit status: 0 when every part passed; 1 without a CUDA GPU or when a part failed; 2 without
# torch or when a missing package has no wheel.
set -uo pipefail
out=${1:?usage: bash tests/gpu_check.sh OUT_DIR [WHEEL_DIR]}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
wheels=${2:-.whl}
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
json="$out/gpu_check.json"

record() {  # record KEY JSON_VALUE: one entry of gpu_check.json, written at once
  "$PYTHON" - "$json" "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
path, key, value = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
data = json.loads(path.read_text()) if path.is_file() else {}
data[key] = value
path.write_text(json.dumps(data, indent=2))
PY
}

if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "gpu_check: torch is not importable with $PYTHON: this check uses the machine's own torch and installs none"
  exit 2
fi
: > "$out/parts.txt"
record torch "\"$torch_version\""

# Packages of tests/gpu_check_wheels.txt whose module does not import here: installed from the wheel folder.
missing=$("$PYTHON" - tests/gpu_check_wheels.txt <<'PY'
import importlib, sys
for line in open(sys.argv[1]):
    requirement = line.split("#")[0].strip()
    if requirement:
        try:
            importlib.import_module(line.split("# import ")[1].strip())
        except ImportError:
            print(requirement)
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: installing from $wheels (no index): $(echo $missing)"
  # shellcheck disable=SC2086
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$out/deps" $missing \
      > "$out/deps.log" 2>&1; then
    echo "gpu_check: a missing package has no wheel in $wheels (see $out/deps.log): pip download --no-deps -d .whl -r tests/gpu_check_wheels.txt on a machine with a network"
    record deps "{\"installed\": false, \"missing\": \"$(echo $missing)\"}"
    exit 2
  fi
  export PYTHONPATH="$out/deps${PYTHONPATH:+:$PYTHONPATH}"
fi
record deps "{\"installed\": \"$(echo $missing)\"}"

if ! gpu=$("$PYTHON" -c "import sys, torch; print(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else sys.exit(1)" 2>/dev/null); then
  echo "gpu_check: no CUDA GPU here (torch $torch_version, torch.cuda.is_available() is False): nothing measured"
  record gpu false
  exit 1
fi
record gpu "\"$gpu\""

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local started=$SECONDS rc
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name $rc $((SECONDS - started))" >> "$out/parts.txt"
  record "$name" "{\"rc\": $rc, \"seconds\": $((SECONDS - started))}"
}
part gpu_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml "$out/gpu_tests.xml"
part benchmark 90 "$PYTHON" -m utils.benchmark --device cuda --batches 4 --output-dir "$out/benchmark"
part jobs_per_gpu 100 "$PYTHON" -m utils.study.jobs_rate --device cuda --jobs 1,2,4 --batches 6 --output-dir "$out/jobs"
part study 120 "$PYTHON" main.py --dry-run --epochs 1 --image-size 224 --backbone resnet18 --device cuda \
  --output-dir "$out/study" --report-file "$out/study/R.md" --no-live-report

"$PYTHON" - "$out" <<'PY'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
result = json.loads((out / "gpu_check.json").read_text())
bench = out / "benchmark" / "tables" / "benchmark.csv"
if bench.is_file():
    result["benchmark"] = {row["metric"]: row["value"] for row in csv.DictReader(bench.open())}
jobs = out / "jobs" / "tables" / "jobs_rate.csv"
if jobs.is_file():
    result["jobs_per_gpu"] = list(csv.DictReader(jobs.open()))
parts = [line.split() for line in (out / "parts.txt").read_text().splitlines()]
result["passed"] = all(rc == "0" for _, rc, _ in parts)
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'} on {result['gpu']} -> {out / 'gpu_check.json'}")
sys.exit(0 if result["passed"] else 1)
PY
