#!/usr/bin/env bash
# cuda_ipc on one GPU (no SGLang needed): the cross-process GPU checks, the benchmark, and the
# weight-protocol tests with a GPU present. Run from the repository root:
#
#   bash tests/gpu/run_cuda_ipc.sh [checks|bench|tests|all|quick]     # default: all
#   (quick: the cuda_ipc pytest file and the benchmark)
#
# Needs pyzmq, msgspec, structlog (and pytest-asyncio for "tests"): taken from .whl/ when present
# (the GPU machine has no internet; the image has torch, transformers, uvloop, pytest).
# $OUT (default /tmp/rw-gpu-out) gets cuda_ipc_gpu.json, weights_cuda_ipc.json and cuda_ipc_logs.tgz;
# the benchmark JSON is also written to bench/results/weights_cuda_ipc.json.
set -o pipefail
export PYTHONUNBUFFERED=1
WHAT=${1:-all}
OUT=${OUT:-/tmp/rw-gpu-out}; export OUT; mkdir -p "$OUT"
LOGS=/tmp/rw-cuda-ipc-logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
T0=$(date +%s)
if [ -d .whl ]; then
  wheels=$(ls .whl/pyzmq-*.whl .whl/msgspec-*.whl .whl/structlog-*.whl .whl/pytest_asyncio-*.whl 2>/dev/null)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
  export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 tests/gpu/env_check.py 2>&1 | tee "$LOGS/env.log"
[ $? -eq 0 ] || { echo "environment check failed"; exit 1; }

step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$(( t - T0 ))s)"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "^(PASS|FAIL|SUMMARY|FATES)|passed|failed|skipped|Error" "$LOGS/$name.log" | grep -v "^\s*$" | cut -c1-300 | tail -40
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s"
}

case $WHAT in checks|all) step checks 150 python3 tests/gpu/test_cuda_ipc_gpu.py ;; esac
case $WHAT in bench|all|quick)
  step bench 200 python3 bench/gpu/cuda_ipc.py --repeats 7 --out "$OUT/weights_cuda_ipc.json"
  sed -n '/^size/,$p' "$LOGS/bench.log"
  cp "$OUT/weights_cuda_ipc.json" bench/results/weights_cuda_ipc.json 2>/dev/null ;;
esac
case $WHAT in tests|all|quick) step pytest_cuda_ipc 120 python3 -m pytest -q -p no:cacheprovider tests/weights/test_cuda_ipc.py ;; esac
case $WHAT in tests|all) step pytest_weights 150 python3 -m pytest -q -x -p no:cacheprovider tests/weights ;; esac
[ -f "$OUT/cuda_ipc_gpu.json" ] || cp /tmp/cuda_ipc_gpu.json "$OUT/" 2>/dev/null
tar czf "$OUT/cuda_ipc_logs.tgz" -C "$LOGS" . && echo "logs: $OUT/cuda_ipc_logs.tgz (+$(( $(date +%s) - T0 ))s total)"
