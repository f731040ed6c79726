#!/usr/bin/env bash
# The full benchmark suite and the GPU part of the scale benchmark, in one run on a GPU machine.
#
#   bash benchmarks/gpu.sh            # from the repository root; results under $OUT (default /tmp/bench-out)
#
# Python packages the machine lacks can sit as wheels in .whl/ (installed to /tmp/site), and
# Fashion-MNIST's four .gz files in .bench-data/fashion-mnist/ when the Debian package is absent.
# DEADLINE (seconds, default 360): no new model is started after it, so the run fits a lease.
# WORKERS (default 2): processes sharing the GPU; each trains its share of an architecture's models
# as one group (benchmarks/group.py), so few workers keep the groups large.
set -u
OUT=${OUT:-/tmp/bench-out}
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
if [ -z "${SKIP_MICRO:-}" ]; then
  python3 -m benchmarks.run --suite micro --device cuda --out /tmp/micro --quiet || exit 1
  echo "micro suite ok"
fi
# one-by-one against grouped fine-tunes, side by side (~1 min; SKIP_GROUP=1 skips it)
[ -n "${SKIP_GROUP:-}" ] || timeout "${GROUP_TIMEOUT:-120}" python3 -m benchmarks.scale group --device cuda \
  --out "$OUT/group-gpu.json" >"$OUT/group-gpu.log" 2>&1
echo "group benchmark: exit $?"
start=$(date +%s)
# a model started just before the deadline still finishes; the hard stop is for a hung run
timeout "$(( ${DEADLINE:-360} + ${GRACE:-120} ))" python3 -m benchmarks.run --suite full --device cuda \
  --workers "${WORKERS:-2}" --threads 1 --deadline "${DEADLINE:-360}" ${MODELS:+--models "$MODELS"} \
  >"$OUT/full.log" 2>&1
echo "full suite: exit $? after $(( $(date +%s) - start )) s"
cp benchmarks/results/full.md benchmarks/results/full.json "$OUT/" 2>/dev/null
# per-model evaluations (not the weights): the tables can be rebuilt and extended from them
tar czf "$OUT/full-cache.tgz" --exclude=model.pt -C benchmarks/results cache/full
[ -n "${SKIP_SCALE:-}" ] || timeout "${SCALE_TIMEOUT:-80}" python3 -m benchmarks.scale overhead --device cuda --out "$OUT/scale-gpu.json" \
  >"$OUT/scale-gpu.log" 2>&1
echo "scale overhead: exit $?"
tail -5 "$OUT/full.log"
