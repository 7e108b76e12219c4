#!/usr/bin/env bash
# One lent GPU session (issue 21's "one prepared script"): the GPU data path benchmark alone on the GPU,
# then the -m gpu tests beside the demo DiT-Mini/2 training run (bench/dit_recipes.py), each under its own
# timeout so that everything lands in $OUT within ~9 minutes on one H100.
#
#   bash bench/gpu_session.sh        # from the repository root, with the py3.12 wheels in .whl/
#
# $OUT gets at most 8 files (the device tool's limit): env.log, gpu_pipeline.log, gpu_pipeline.json,
# pytest_gpu.log, dit_mini.log, w_mini256.safetensors, summary.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$SECONDS
MINI_BUDGET_S=${MINI_BUDGET_S:-270}

source bench/gpu_env.sh  # wheels, PYTHONPATH, $OUT/env.log

echo "== 1. GPU data path benchmark, alone on the GPU ($((SECONDS - START)) s)"
timeout 210 $PY bench/gpu_pipeline.py --budget-s 100 --rounds 2 --processes 2 ${BENCH_ARGS:-} > "$OUT/gpu_pipeline.log" 2>&1
BENCH=$?
[ -f "$OUT/gpu_pipeline.json" ] || cp /tmp/gpu_pipeline.json "$OUT/" 2>/dev/null
grep -v "^WARNING" "$OUT/gpu_pipeline.log" | tail -25

echo "== 2. DiT-Mini/2 training (${MINI_BUDGET_S} s) beside the GPU tests ($((SECONDS - START)) s)"
timeout $((MINI_BUDGET_S + 150)) $PY bench/dit_recipes.py mini256 \
  '{"model": "DiT-Mini/2", "batch_size": 256, "ema_decay": 0.999}' --budget-s "$MINI_BUDGET_S" \
  --out "$OUT" > "$OUT/dit_mini.log" 2>&1 &
MINI_PID=$!
timeout 170 $PY -m pytest -m gpu -q -p no:cacheprovider -rA \
  tests/test_gpu.py tests/test_gpu_decode.py tests/test_device.py > "$OUT/pytest_gpu.log" 2>&1
TESTS=$?
tail -25 "$OUT/pytest_gpu.log"
wait $MINI_PID
MINI=$?
rm -rf "$OUT/.barrier"
tail -8 "$OUT/dit_mini.log"

echo "== done in $((SECONDS - START)) s: benchmark exit $BENCH, tests exit $TESTS, DiT-Mini exit $MINI" | tee "$OUT/summary.log"
ls -la "$OUT"
