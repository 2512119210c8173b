#!/usr/bin/env bash
# The accelerator timings in BUILD_NOTES ("GPU timings"): the Gated train step dense vs sparse in
# float32 and bfloat16, at the 10240- and 65536-feature shapes and the paper's 2^17, TopK, and
# 3-member sweeps. Run from the repository root on a machine with one GPU:
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log
set -uo pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
py=${PYTHON:-python3}
step() { $py benchmarks/train_step.py --rounds=3 --steps=5 --peak_size=8192 "$@" 2>&1 | grep -v "^I1\|^W1"; }
$py -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
for dtype in float32 bfloat16; do
  for m in 10240 65536 131072; do
    step --d_sae=$m --l0=32 --path=both --compute_dtype=$dtype | tail -1
  done
  step --architecture=topk --d_sae=65536 --l0=32 --capacity=32 --path=both --compute_dtype=$dtype | tail -1
  $py benchmarks/sweep.py --d_sae=10240 --batch=4096 --members=3 --compute_dtype=$dtype 2>&1 | tail -1
done
step --d_sae=10240 --path=dense | tail -4
