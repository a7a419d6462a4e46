#!/usr/bin/env bash
# rollwire's SGLang backend on a GPU machine (../shared/gpu/README.md says how SGLang gets there).
# Run from the repository root, with the kit's wheels in .whl/ (bash ../shared/gpu/build_wheels.sh):
#
#   bash tests/gpu/run_gpu.sh [checks|bench|all]      # default: all
#
# checks: direct sglang.Engine smoke + reference outputs, then rollwire's SGLangEngine on the same
#         inputs, then a RolloutServer with a rollout-worker process and governor pushes under load
# bench:  bench/gpu/throughput.py on a random Qwen2-0.5B-shaped model (direct, server, adapter)
# Logs and JSON are written to a work folder, then $OUT (default /tmp/rw-gpu-out) gets
# summary_<what>.json (every check and figure) and logs_<what>.tgz (all logs and JSON).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
WHAT=${1:-all}
FINAL=${OUT:-/tmp/rw-gpu-out}; mkdir -p "$FINAL"
OUT=/tmp/rw-gpu-work-$WHAT; export OUT; rm -rf "$OUT"; mkdir -p "$OUT"
T0=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
  export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.log"
import importlib, torch
for m in ("zmq", "msgspec", "uvloop", "structlog", "transformers"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "ok"))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0), torch.__version__)
PY
[ $? -eq 0 ] || { echo "environment check failed (see $OUT/env.log)"; exit 1; }

step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$(( t - T0 ))s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(PASS|FAIL|FIGURE|SUMMARY)" "$OUT/$name.log" | cut -c1-400
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t ))}" >> "$OUT/steps.jsonl"
}

TINY=/tmp/rw-tiny; Q05=/tmp/rw-qwen05b
MODES="direct server adapter"
[ "$WHAT" = final ] && MODES="server adapter"  # direct measured in an earlier call
if [ "$WHAT" != bench ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); from common import *; write_qwen2('$TINY', TINY, std=TINY_STD, head_std=TINY_HEAD_STD)"
  step direct_sglang 300 python3 tests/gpu/direct_sglang.py "$TINY"
  step adapter_checks 420 python3 tests/gpu/adapter_checks.py "$TINY" "$OUT/direct_ref.json"
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ] || [ "$WHAT" = final ]; then
  step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
  for mode in $MODES; do
    step "throughput_$mode" 300 python3 bench/gpu/throughput.py --mode "$mode" --model "$Q05"
  done
  python3 bench/gpu/throughput.py --mode combine --out "$OUT/throughput.json" > /dev/null && cat "$OUT/throughput.json"
fi
python3 - <<'PY'
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
summary = {"steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()] if (out / "steps.jsonl").exists() else []}
for name in ("direct_sglang", "adapter_checks", "throughput"):
    p = out / f"{name}.json"
    if p.exists():
        summary[name] = json.loads(p.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print("wrote", out / "summary.json")
PY
cp "$OUT/summary.json" "$FINAL/summary_$WHAT.json"
tar czf "$FINAL/logs_$WHAT.tgz" -C "$OUT" .
echo "total $(( $(date +%s) - T0 ))s"
