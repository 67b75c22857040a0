#!/usr/bin/env bash
# The GPU benchmark suite of docs/benchmarks.md: PAN-R101 at 512², bf16, against SMP in PyTorch.
# Usage: bash launch/bench_gpu.sh OUTDIR
# The parts run in order of importance, each time-boxed, and all of them within BENCH_BUDGET_S
# seconds (default 570: one 10-minute device call); a part that would not get 30 s is skipped.
# Each writes its JSON as it goes, so a cut run still leaves every finished figure. The first
# part also writes a jax.profiler trace of the training step and prints where its time goes.
# BENCH_EXTRA_ARGS (e.g. "--backbone=resnet18 --crop=128") is appended to every bench command.
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
read -ra extra <<<"${BENCH_EXTRA_ARGS:-}"
deadline=$((SECONDS + ${BENCH_BUDGET_S:-570}))
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"

run() {  # run NAME SECONDS ARGS...
  local name=$1 seconds=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 30)); then
    echo "skipped $name: ${left} s left of BENCH_BUDGET_S" | tee "$out/$name.log"
    return
  fi
  timeout "$((seconds < left ? seconds : left))" python3 -m pan_jax.bench --backbone=resnet101 \
    --crop=512 --dtype=bfloat16 --json="$out/$name.json" "$@" "${extra[@]}" 2>&1 |
    grep -v -i warn | tee "$out/$name.log"
}

largest() {  # largest JSON: the largest batch the bench estimated for its train step, or nothing
  python3 -c 'import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r.get("largest_batch_estimate")]
print(rows[0]["largest_batch_estimate"] if rows else "")' "$1" 2>/dev/null
}

# pan_smp vs SMP eager at batch 16, train and forward, with the profile of our train step.
run smp 150 --model=pan_smp --batch=16 --what=train,forward --peer=eager \
  --profile_dir="$out/profile"
# The paper's model (deep stem, 128-wide decoder).
run pan 90 --model=pan --batch=16 --what=train --peer=none
# torch.compile peer (its compile is slow, so it runs alone).
run compile 120 --model=pan_smp --batch=16 --what=train --peer=compile --nojax --peak_tflops=1
# The largest batch that fits, from XLA's memory plan of the batch-16 step (bench.largest_batch).
batch=$(largest "$out/smp.json")
if [[ -n $batch ]]; then
  run batch_smp 100 --model=pan_smp --batch="$batch" --what=train --peer=none
fi
# 1×1 convolutions as cuDNN convolutions instead of matmuls (the default since the first H200
# run): the A/B of that choice on this GPU.
run pointwise 80 --model=pan_smp --batch=16 --what=train --peer=none --pointwise_conv=conv
batch=$(largest "$out/pan.json")
if [[ -n $batch ]]; then
  run batch_pan 100 --model=pan --batch="$batch" --what=train --peer=none
fi
