#!/usr/bin/env bash
# rollwire's SGLang backend on a GPU machine (../shared/gpu/README.md says how SGLang gets there).
# Run from the repository root, with the kit's wheels in .whl/ (bash ../shared/gpu/build_wheels.sh):
#
#   bash tests/gpu/run_gpu.sh [checks|bench|all|final|issue5|e2e|issue15|ipc_speed]      # default: all
#
# checks: direct sglang.Engine smoke + reference outputs, then rollwire's SGLangEngine on the same
#         inputs, then a RolloutServer with a rollout-worker process and governor pushes under load
# bench:  bench/gpu/throughput.py on a random Qwen2-0.5B-shaped model (direct, server, adapter)
# issue5: the checks and the engine contract suite on sglang side by side (two engines on one GPU,
#         correctness only), then the server and adapter throughput runs alone (direct
#         async_generate is measured inside the adapter run)
# e2e:    tests/gpu/e2e_sglang.py (rollwire serve colocated + trainer process pushing cuda_ipc + worker
#         process; push vs direct update_weights_from_tensor; release/resume per tag), then
#         bench/gpu/throughput_paired.py (server vs direct sglang.Engine, alternated, same run)
# recheck: adapter checks against REF (a direct_ref.json of the same GPU kind; none: direct_sglang makes one),
#          then tests/gpu/engine_death.py (sigkill)
# issue15: after the weight-path and engine-package moves: SGLang output traces recorded for the CPU
#         replay (tests/gpu/traces/), direct reference + adapter checks, the engine contract suite on
#         sglang; then (E2E=1) tests/gpu/e2e_sglang.py with CYCLES cycles (the cuda_ipc push figure)
# ipc_speed: tests/weights/test_cuda_ipc.py on the GPU (the one-pass checksum kernel against its
#         definition), bench/gpu/cuda_ipc.py at ~1 GB (pack, checksum passes), then e2e_sglang.py
#         (3 colocated cycles, 1 under load, 7 timed pushes: the push vs SGLang's direct updates)
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
python3 tests/gpu/env_check.py 2>&1 | tee "$OUT/env.log"
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
if [ "$WHAT" = issue5 ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); from common import *; write_qwen2('$TINY', TINY, std=TINY_STD, head_std=TINY_HEAD_STD)"
  step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
  # One after the other: on the H200 (2026-12-04) the contract suite's engine died at start (SIGQUIT from a
  # child, rc 131, nothing logged) while direct_sglang's engine started beside it; alone it passed.
  step direct_sglang 300 python3 tests/gpu/direct_sglang.py "$TINY"
  step adapter_checks 420 python3 tests/gpu/adapter_checks.py "$TINY" "$OUT/direct_ref.json"
  ( export ROLLWIRE_SGLANG_ENGINE_ARGS="attention_backend=triton,sampling_backend=pytorch,cuda_graph_max_bs_decode=32"
    step contract 400 python3 -m pytest -q -s -p no:cacheprovider --timeout=150 -k sglang \
      --junitxml="$OUT/contract.xml" -rfE tests/engines/test_engine_contract.py tests/engines/test_engine_contract_control.py )
  grep -E "passed|failed|FAILED|ERROR" "$OUT/contract.log" | tail -15 | cut -c1-300
  if [ -z "${SKIP_THROUGHPUT:-}" ]; then  # SKIP_THROUGHPUT=1: correctness only (throughput_paired measures speed)
    for mode in server adapter; do
      step "throughput_$mode" 300 python3 bench/gpu/throughput.py --mode "$mode" --model "$Q05"
    done
    python3 bench/gpu/throughput.py --mode combine --out "$OUT/throughput.json" > /dev/null && cat "$OUT/throughput.json"
    cp "$OUT/throughput.json" "$FINAL/throughput_$WHAT.json" 2>/dev/null
  fi
elif [ "$WHAT" = issue5b ]; then  # contract suite alone, checks against a kept reference, profiled server
  python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); from common import *; write_qwen2('$TINY', TINY, std=TINY_STD, head_std=TINY_HEAD_STD)"
  step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
  ( export ROLLWIRE_SGLANG_ENGINE_ARGS="attention_backend=triton,sampling_backend=pytorch,cuda_graph_max_bs_decode=32"
    step contract "${CONTRACT_S:-170}" python3 -m pytest -q -s -p no:cacheprovider --timeout=100 -k sglang \
      --junitxml="$OUT/contract.xml" -rfE tests/engines/test_engine_contract.py tests/engines/test_engine_contract_control.py )
  grep -E "passed|failed|FAILED|ERROR|Error|error" "$OUT/contract.log" | grep -v "Ignore import error" | tail -30 | cut -c1-300
  step adapter_checks "${CHECKS_S:-130}" python3 tests/gpu/adapter_checks.py "$TINY" "${REF:-$OUT/direct_ref.json}"
  SPY=""
  if ls tmp_gpu_ref/py_spy-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/spy tmp_gpu_ref/py_spy-*.whl && SPY=/tmp/spy/bin/py-spy
  fi
  step throughput_server "${SERVER_S:-100}" python3 bench/gpu/throughput.py --mode server --model "$Q05" \
    ${SPY:+--py-spy $SPY --py-spy-out $OUT/serve.speedscope.json}
  cp "$OUT/serve.speedscope.json" "$OUT/throughput_server.json" "$FINAL/" 2>/dev/null
  cat "$OUT/throughput_server.json"
elif [ "$WHAT" = recheck ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); from common import *; write_qwen2('$TINY', TINY, std=TINY_STD, head_std=TINY_HEAD_STD)"
  if [ -z "${REF:-}" ]; then  # no kept reference for this GPU kind: make one first
    step direct_sglang 200 python3 tests/gpu/direct_sglang.py "$TINY"
    REF=$OUT/direct_ref.json
  fi
  step adapter_checks "${CHECKS_S:-300}" python3 tests/gpu/adapter_checks.py "$TINY" "$REF"
  step engine_death "${DEATH_S:-170}" python3 tests/gpu/engine_death.py "$TINY" --how sigkill
  cp "$OUT"/engine_death*.json "$FINAL/" 2>/dev/null
elif [ "$WHAT" = issue15 ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); from common import *; write_qwen2('$TINY', TINY, std=TINY_STD, head_std=TINY_HEAD_STD)"
  step record_traces 200 python3 tests/gpu/record_sglang_traces.py --out "$OUT/traces"
  cp -r "$OUT/traces" "$FINAL/" 2>/dev/null
  step direct_sglang 200 python3 tests/gpu/direct_sglang.py "$TINY"
  step adapter_checks 240 python3 tests/gpu/adapter_checks.py "$TINY" "$OUT/direct_ref.json"
  ( export ROLLWIRE_SGLANG_ENGINE_ARGS="attention_backend=triton,sampling_backend=pytorch,cuda_graph_max_bs_decode=32"
    step contract "${CONTRACT_S:-220}" python3 -m pytest -q -s -p no:cacheprovider --timeout=100 -k sglang \
      --junitxml="$OUT/contract.xml" -rfE tests/engines/test_engine_contract.py tests/engines/test_engine_contract_control.py )
  grep -E "passed|failed|FAILED|ERROR" "$OUT/contract.log" | tail -15 | cut -c1-300
  if [ -n "${E2E:-}" ]; then
    step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
    step e2e_sglang "${E2E_S:-300}" python3 tests/gpu/e2e_sglang.py "$Q05" --cycles "${CYCLES:-3}"
    cp "$OUT/e2e_sglang.json" "$FINAL/" 2>/dev/null
  fi
elif [ "$WHAT" = ipc_speed ]; then  # the cuda_ipc push: GPU checksum checks, its parts, the push on SGLang
  step pytest_cuda_ipc 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/weights/test_cuda_ipc.py \
    tests/engines/test_sglang_flat_bucket.py
  grep -E "passed|failed|FAILED|ERROR" "$OUT/pytest_cuda_ipc.log" | tail -8 | cut -c1-300
  step cuda_ipc_bench "${BENCH_S:-150}" python3 bench/gpu/cuda_ipc.py --layers 10 --repeats 7 --out "$OUT/weights_cuda_ipc.json"
  sed -n '/^size/,$p' "$OUT/cuda_ipc_bench.log"
  cp "$OUT/weights_cuda_ipc.json" "$FINAL/" 2>/dev/null
  step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
  step e2e_sglang "${E2E_S:-240}" python3 tests/gpu/e2e_sglang.py "$Q05" --cycles 3 --load-cycles 1 --repeats 7
  cp "$OUT/e2e_sglang.json" "$FINAL/" 2>/dev/null
elif [ "$WHAT" = e2e ]; then  # issue 5 end to end (serve + trainer cuda_ipc + worker, colocated), then throughput paired
  step write_model 120 python3 bench/gpu/throughput.py --mode write-model --model "$Q05"
  step e2e_sglang "${E2E_S:-330}" python3 tests/gpu/e2e_sglang.py "$Q05" --cycles "${CYCLES:-20}"
  cp "$OUT/e2e_serve.log" "$FINAL/" 2>/dev/null
  SPY=""
  if ls tmp_gpu_ref/py_spy-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/spy tmp_gpu_ref/py_spy-*.whl && SPY=/tmp/spy/bin/py-spy
  fi
  RW_SGLANG_LOG_LEVEL=info step throughput_paired "${PAIRED_S:-230}" python3 bench/gpu/throughput_paired.py --model "$Q05" --repeats "${PAIRED_REPEATS:-7}" ${SPY:+--py-spy $SPY}
  cp "$OUT"/throughput_paired*.json "$OUT"/e2e_sglang.json "$FINAL/" 2>/dev/null
elif [ "$WHAT" != bench ]; then
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
for name in ("direct_sglang", "adapter_checks", "throughput", "e2e_sglang", "throughput_paired"):
    p = out / f"{name}.json"
    if p.exists():
        summary[name] = json.loads(p.read_text())
if (out / "contract.xml").exists():  # the engine contract suite on sglang (junit xml from pytest)
    import xml.etree.ElementTree as ET
    cases = []
    for tc in ET.parse(out / "contract.xml").getroot().iter("testcase"):
        bad = next((c for c in tc if c.tag in ("failure", "error", "skipped")), None)
        cases.append({"name": tc.get("name"), "s": float(tc.get("time") or 0),
                      "result": "passed" if bad is None else bad.tag,
                      "message": "" if bad is None else (bad.get("message") or "")[:400]})
    summary["contract"] = {"passed": sum(c["result"] == "passed" for c in cases),
                           "failed": sum(c["result"] in ("failure", "error") for c in cases),
                           "skipped": sum(c["result"] == "skipped" for c in cases), "cases": cases}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print("wrote", out / "summary.json")
PY
cp "$OUT/summary.json" "$FINAL/summary_$WHAT.json"
tar czf "$FINAL/logs_$WHAT.tgz" -C "$OUT" .
echo "total $(( $(date +%s) - T0 ))s"
