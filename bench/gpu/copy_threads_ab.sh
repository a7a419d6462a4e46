#!/usr/bin/env bash
# shm push vs two warm memcpys on the GPU machine's 16 quiet cores, with the weight copies and
# checksums on THREADS threads each (ROLLWIRE_COPY_THREADS), alternated so drift hits all alike.
# Run from the repository root with the kit's wheels in .whl/ (bench/gpu/cpu_figures.sh installs them):
#   THREADS="4 8 16" SIZES="1 10" ROUNDS=2 bash bench/gpu/copy_threads_ab.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rw-copy-threads}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
fi
for round in $(seq "${ROUNDS:-2}"); do
  for t in ${THREADS:-4 8 16}; do
    ROLLWIRE_COPY_THREADS=$t timeout "${RUN_S:-150}" python3 bench/weights.py --sizes ${SIZES:-1 10} --paths shm \
      --repeats "${REPEATS:-5}" --out "$OUT/weights_t${t}_r$round.json" > "$OUT/weights_t${t}_r$round.log" 2>&1
    echo "== threads $t round $round rc=$?"
    grep -E "shm -> server .* [0-9]+%$|: push .* ms" "$OUT/weights_t${t}_r$round.log" | cut -c1-210
  done
done
