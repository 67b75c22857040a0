#!/usr/bin/env bash
# The GPU benchmark suite of docs/benchmarks.md: PAN-R101 at 512², bf16, against SMP in PyTorch.
# Usage: bash launch/bench_gpu.sh OUTDIR
# Each part is time-boxed (about 8 minutes in all on an H200, most of it XLA compiles) and writes
# its JSON as it goes, so a cut run still leaves every finished figure. The first part also
# writes a jax.profiler trace of the training step and prints where its time goes.
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
# pan_smp vs SMP eager at batch 16, train and forward, with the profile of our train step.
run smp 150 --model=pan_smp --batch=16 --what=train,forward --peer=eager \
  --profile_dir="$out/profile"
# The paper's model (deep stem, 128-wide decoder).
run pan 80 --model=pan --batch=16 --what=train --peer=none
# The largest batch: 64 is far below the H200's memory at 6.4 GB per 16 images.
run batch 90 --model=pan_smp --batch=64 --what=train --peer=none
# 1×1 convolutions as cuDNN convolutions instead of matmuls (the default since the first H200
# run): the A/B of that choice on this GPU.
run pointwise 80 --model=pan_smp --batch=16 --what=train --peer=none --pointwise_conv=conv
# torch.compile peer (its compile is slow, so it runs last and alone).
run compile 120 --model=pan_smp --batch=16 --what=train --peer=compile --nojax --peak_tflops=1
