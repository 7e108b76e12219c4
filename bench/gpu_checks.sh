#!/usr/bin/env bash
# The GPU data path's checks on a fresh GPU machine without a package registry (issues 19 and 21):
# install the carried wheels, run the GPU tests, then the GPU pipeline benchmark. Logs and the
# benchmark's JSON go to $OUT (the device tool's output folder; /tmp/gpu-checks without it).
#
#   bash bench/gpu_checks.sh            # from the repository root; ~4 minutes on one H100 (give it 7)
#   BENCH_ARGS="--samples 128 --shard-size 64 --rounds 1 --model shapes-clip" bash bench/gpu_checks.sh  # CPU smoke
#
# Wheels: .whl/*.whl (py3.12: open_clip_torch, ftfy, wcwidth, webdataset, braceexpand, pydantic,
# pydantic-core, annotated-types, typing-inspection; optionally nvidia-nvimgcodec-cu13) go to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
START=$SECONDS

source bench/gpu_env.sh  # wheels, PYTHONPATH, $OUT/env.log

echo "== GPU tests ($((SECONDS - START)) s)"
timeout 180 $PY -m pytest -m gpu -q -p no:cacheprovider -rA \
  tests/test_gpu.py tests/test_gpu_decode.py tests/test_device.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
TESTS=${PIPESTATUS[0]}

echo "== GPU pipeline benchmark ($((SECONDS - START)) s)"
timeout 240 $PY bench/gpu_pipeline.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_pipeline.log" | grep -v "^WARNING"
BENCH=${PIPESTATUS[0]}

echo "== done in $((SECONDS - START)) s: tests exit $TESTS, benchmark exit $BENCH" | tee "$OUT/summary.log"
exit $(( TESTS != 0 || BENCH != 0 ))
