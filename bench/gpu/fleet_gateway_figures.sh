#!/usr/bin/env bash
# Issues 16 and 17 in one device call (a fresh machine is scarce): the CPU figures on the 16 quiet
# cores first (bench/fleet.py aggregate, bench/gateway.py), then the SGLang part on the GPU
# (bench/gpu/serving_sglang.py: two servers sharing the GPU behind a RolloutFleet; the gateway vs
# SGLang's own OpenAI server). Each step bounded; logs and JSON in $OUT. From the repository root,
# with the kit's wheels in .whl/:   bash bench/gpu/fleet_gateway_figures.sh
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/rw-fleet-gateway}; mkdir -p "$OUT"; export OUT
T0=$(date +%s)
OUT=$OUT FLEET_REPEATS=${FLEET_REPEATS:-1} FLEET_S=${FLEET_S:-90} GATEWAY_REPEATS=${GATEWAY_REPEATS:-2} \
  GATEWAY_S=${GATEWAY_S:-110} bash bench/gpu/cpu_figures.sh fleet gateway
echo "=== cpu figures done at +$(( $(date +%s) - T0 ))s"
export PYTHONPATH=/tmp/site:$PWD/src:$PWD  # cpu_figures.sh installed the kit's wheels there
timeout "${SERVING_S:-380}" python3 bench/gpu/serving_sglang.py --device-info --concurrency ${SERVING_CONC:-8 64} \
  --fleet-concurrency ${SERVING_FLEET_CONC:-128} --repeats 2 --seconds 5 > "$OUT/serving.log" 2>&1
echo "=== serving_sglang rc=$? at +$(( $(date +%s) - T0 ))s"
grep -v -E "\[(info|debug) *\]" "$OUT/serving.log" | tail -40
