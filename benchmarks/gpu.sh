#!/usr/bin/env bash
# The full benchmark suite and the GPU part of the scale benchmark, in one run on a GPU machine.
#
#   bash benchmarks/gpu.sh            # from the repository root; results under $OUT (default /tmp/bench-out)
#
# Python packages the machine lacks can sit as wheels in .whl/ (installed to /tmp/site), and
# Fashion-MNIST's four .gz files in .bench-data/fashion-mnist/ when the Debian package is absent.
# DEVICE=cpu GROUP_SPEC=preact18-w8:1,4 DEADLINE=1 GRACE=20 RES=/tmp/res dry-runs the
# script's logic on a CPU (RES: where the suite writes its tables and cache; default benchmarks/results).
# Sized for one 600-second device call: micro <= 90 s, group benchmark <= 120 s, full suite
# <= DEADLINE + GRACE = 390 s. DEADLINE (seconds, default 300): no new model is started after it;
# a resumed call on the same warm machine (SKIP_MICRO=1 SKIP_GROUP=1, ONE_BY_ONE=1 if the first
# call chose it) continues from the cache. RUN_SCALE=1 adds the audit-overhead part (~80 s).
# WORKERS (default 2): processes sharing the GPU; each trains its share of an architecture's models
# as one group (benchmarks/group.py), so few workers keep the groups large.
set -u
OUT=${OUT:-/tmp/bench-out}
RES=${RES:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -d .bench-data/fashion-mnist ] && export HUB_BACKDOOR_FASHION_DIR=$PWD/.bench-data/fashion-mnist
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers, numpy; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
# the harness end to end on the GPU in seconds before the long run (SKIP_MICRO=1: a rerun)
# (stacked first; if vmap fails on this machine the full suite runs one model at a time)
if [ -z "${SKIP_MICRO:-}" ]; then
  if timeout 90 python3 -m benchmarks.run --suite micro --device "${DEVICE:-cuda}" --out /tmp/micro --quiet 2>"$OUT/micro.err"; then
    echo "micro suite ok (stacked)"
  else
    tail -3 "$OUT/micro.err"; echo "micro suite failed stacked: the full suite runs --one-by-one"
    ONE_BY_ONE=1
    timeout 90 python3 -m benchmarks.run --suite micro --device "${DEVICE:-cuda}" --out /tmp/micro1 --quiet --one-by-one || exit 1
  fi
fi
# one-by-one against stacked fine-tunes and trainings of the three architectures, side by side (~1-2 min;
# SKIP_GROUP=1 skips it). Stacking is used only if this ran and paid for every G > 1.
if [ -z "${SKIP_GROUP:-}" ]; then
  timeout "${GROUP_TIMEOUT:-120}" python3 -m benchmarks.scale group --device "${DEVICE:-cuda}" \
    --group "${GROUP_SPEC:-preact18:1,12;vit:1,12;mobilenet:1,12}" --out "$OUT/group-gpu.json" \
    >"$OUT/group-gpu.log" 2>&1
  code=$?
  echo "group benchmark: exit $code"
  if [ "$code" -ne 0 ] || ! python3 -c "import json, sys
r = [x for x in json.load(open(sys.argv[1]))['results'] if x['G'] > 1]
sys.exit(0 if r and min(x['speedup_wall'] for x in r) >= 1.0 else 1)" "$OUT/group-gpu.json"; then
    echo "stacking failed or did not pay here: the full suite runs --one-by-one"; ONE_BY_ONE=1
  fi
fi
start=$(date +%s)
# a model started just before the deadline still finishes; the hard stop is for a hung run
timeout "$(( ${DEADLINE:-300} + ${GRACE:-90} ))" python3 -m benchmarks.run --suite full --device "${DEVICE:-cuda}" \
  --workers "${WORKERS:-2}" --threads 1 --deadline "${DEADLINE:-300}" ${MODELS:+--models "$MODELS"} --out "$RES" \
  ${ONE_BY_ONE:+--one-by-one} \
  >"$OUT/full.log" 2>&1
code=$?
echo "full suite: exit $code after $(( $(date +%s) - start )) s"
# a hard stop leaves no tables: rebuild them from what finished
[ "$code" -eq 0 ] || python3 -m benchmarks.run --suite full --device "${DEVICE:-cuda}" --cached-only --quiet \
  --out "$RES" >>"$OUT/full.log" 2>&1
cp "$RES/full.md" "$RES/full.json" "$OUT/" 2>/dev/null
# per-model evaluations (not the weights): the tables can be rebuilt and extended from them
tar czf "$OUT/full-cache.tgz" --exclude=model.pt -C "$RES" cache/full
if [ -n "${RUN_SCALE:-}" ]; then
  timeout "${SCALE_TIMEOUT:-80}" python3 -m benchmarks.scale overhead --device "${DEVICE:-cuda}" \
    --out "$OUT/scale-gpu.json" >"$OUT/scale-gpu.log" 2>&1
  echo "scale overhead: exit $?"
fi
tail -5 "$OUT/full.log"
