#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md in one script: the bf16 matmul peak, then the CPO++ step
# variants of bench_step.py in bf16 on the `small` and `3b` presets (448 px images, 512
# tokens). Writes logs and JSON under ${OUT:-bench/results}. Needs jax with CUDA, flax,
# optax, orbax, transformers; grain and ml_collections may come as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-bench/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
timeout 150 python3 bench/bench_step.py --presets small --batch 16 --dtype bfloat16 --reps 10 \
  --matmul-n 8192 --out "$OUT" 2>&1 | grep -v '^{"preset"' | tee "$OUT/gpu_small.log"
# Each 3b variant spends ~70 s on random init on the device (H200, 2026-11-27): two variants
# fit one call; naive (which also holds a frozen copy) did not.
timeout 300 python3 bench/bench_step.py --presets 3b --batch 4 --dtype bfloat16 --reps 4 --matmul-n 8192 \
  --variants optimized,optimized+grouped+precomputed_ref --out "$OUT" 2>&1 | tee "$OUT/gpu_3b.log"
