#!/usr/bin/env bash
# The GPU benchmark suite of docs/benchmarks.md: PAN-R101 at 512², bf16, against SMP in PyTorch.
# Usage: bash launch/bench_gpu.sh OUTDIR   (each part is time-boxed; JSON is written as it goes)
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
run() {  # run NAME SECONDS ARGS...
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 -m pan_jax.bench --backbone=resnet101 --crop=512 --dtype=bfloat16 \
    --json="$out/$name.json" "$@" 2>&1 | grep -v -i warn | tee "$out/$name.log"
}
run smp 120 --model=pan_smp --batch=16 --what=train,forward --peer=eager
run pan 70 --model=pan --batch=16 --what=train --peer=none
run compile 90 --model=pan_smp --batch=16 --what=train --peer=compile --nojax --peak_tflops=1
