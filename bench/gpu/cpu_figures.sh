#!/usr/bin/env bash
# The CPU benchmarks on the GPU machine's 16 quiet cores (no GPU used), one step after another, each
# bounded; logs and JSON go to $OUT. Run from the repository root with the kit's wheels in .whl/:
#   bash bench/gpu/cpu_figures.sh [weights rpc fleet gateway]      # default: all four
# (FLEET_REPEATS, FLEET_THREADS: torch threads per fleet server, default a quarter of the CPUs but one;
#  FLEET_PIN=--no-pin leaves the servers' placement to the OS)
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/rw-cpu-figures}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
fi
nproc; python3 -c "import torch, xxhash; print('torch', torch.__version__, 'threads', torch.get_num_threads(), 'xxhash', xxhash.VERSION)"
# rollwire needs xxhash >= 4.0 (pyproject): older ones hash holding the GIL, so the copy threads'
# checksums run one at a time. The GPU image's own may be older: put a cp312 xxhash wheel in .whl/.
python3 -c "import sys, xxhash; sys.exit(int(xxhash.VERSION.split('.')[0]) < 4)" || echo "WARNING: xxhash < 4.0 here"
STEPS=${*:-weights rpc fleet gateway}
quiet() { grep -v -E "\[(info|debug|warning) *\]" "$1" | tail -"${2:-25}"; }
for s in $STEPS; do
  t=$(date +%s)
  case $s in
    weights) timeout "${WEIGHTS_S:-240}" python3 bench/weights.py --sizes 1 10 --paths shm inline --repeats 5 \
               --out "$OUT/weights_h100host.json" > "$OUT/weights.log" 2>&1 ;;
    rpc) timeout "${RPC_S:-90}" python3 bench/rpc_echo.py --configs raw_async rollwire --repeats 5 --calls 3000 \
           --messages 20000 --out "$OUT/rpc_h100host.json" > "$OUT/rpc.log" 2>&1 ;;
    fleet) timeout "${FLEET_S:-200}" python3 bench/fleet.py --parts aggregate --repeats "${FLEET_REPEATS:-3}" --seconds 4 \
             ${FLEET_THREADS:+--threads "$FLEET_THREADS"} ${FLEET_PIN:-} --out "$OUT/fleet_h100host${FLEET_THREADS:+_t$FLEET_THREADS}.json" \
             > "$OUT/fleet.log" 2>&1 ;;
    gateway) timeout "${GATEWAY_S:-240}" python3 bench/gateway.py --concurrency ${GATEWAY_CONC:-1 8 64} --repeats "${GATEWAY_REPEATS:-3}" \
               --out "$OUT/gateway_h100host.json" > "$OUT/gateway.log" 2>&1 ;;
  esac
  echo "=== $s rc=$? in $(( $(date +%s) - t ))s"; quiet "$OUT/$s.log" 22
done
