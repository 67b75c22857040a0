#!/usr/bin/env bash
# The GPU benchmark suite of docs/benchmarks.md: PAN-R101 at 512², bf16, against SMP in PyTorch.
# Usage: bash launch/bench_gpu.sh OUTDIR
# The parts run in order of importance, each time-boxed, and all of them within BENCH_BUDGET_S
# seconds (default 570: one 10-minute device call); a part that would not get 30 s is skipped.
# The first part also traces the training step and prints where its time goes.
# OUTDIR gets few files, whatever the number of parts (a device call brings back at most 8),
# rewritten after every part so that a cut run still leaves every finished figure:
#   bench.json  every part's JSON under its name;  bench.log  the GPU and every part's output;
#   <profile>.xplane.pb.gz and <profile>_hlo.txt.gz  each trace and the compiled step it ran,
#   for `python -m pan_jax.op_profile TRACE --hlo=HLO` (TensorBoard/Perfetto read the trace).
# BENCH_EXTRA_ARGS (e.g. "--backbone=resnet18 --crop=128") is appended to every bench command.
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
parts=$(mktemp -d)  # each part's own JSON and log
export PYTHONUNBUFFERED=1
read -ra extra <<<"${BENCH_EXTRA_ARGS:-}"
deadline=$((SECONDS + ${BENCH_BUDGET_S:-570}))
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$parts/gpu.log"
echo gpu >"$parts/order"

collect() {  # merges the parts into OUTDIR (see the top)
  python3 - "$parts" "$out" <<'PY'
import glob, gzip, json, os, sys

parts, out = sys.argv[1:]
names = open(os.path.join(parts, "order")).read().split()
merged, log = {}, []
for name in names:
    if os.path.exists(os.path.join(parts, f"{name}.json")):
        try:
            merged[name] = json.load(open(os.path.join(parts, f"{name}.json")))
        except ValueError as error:
            merged[name] = {"error": f"unreadable JSON: {error}"}
    if os.path.exists(os.path.join(parts, f"{name}.log")):
        log.append(f"===== {name}\n" + open(os.path.join(parts, f"{name}.log")).read())
json.dump(merged, open(os.path.join(out, "bench.json"), "w"), indent=1)
open(os.path.join(out, "bench.log"), "w").write("\n".join(log))
for profile in sorted(glob.glob(os.path.join(parts, "profile", "*"))):
    name = os.path.basename(profile)
    traces = sorted(glob.glob(os.path.join(profile, "plugins", "profile", "*", "*.xplane.pb")))
    for source, target in [(traces[-1] if traces else None, f"{name}.xplane.pb.gz"),
                           (os.path.join(profile, "hlo.txt"), f"{name}_hlo.txt.gz")]:
        if source and os.path.exists(source):
            with open(source, "rb") as f, gzip.open(os.path.join(out, target), "wb") as g:
                g.write(f.read())
PY
}

run() {  # run NAME SECONDS ARGS...
  local name=$1 seconds=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 30)); then
    echo "skipped $name: ${left} s left of BENCH_BUDGET_S" | tee "$parts/$name.log"
    echo "$name" >>"$parts/order"
    collect
    return
  fi
  local limit=$((seconds < left ? seconds : left))
  timeout "$limit" python3 -m pan_jax.bench --backbone=resnet101 \
    --crop=512 --dtype=bfloat16 --json="$parts/$name.json" "$@" "${extra[@]}" 2>&1 |
    grep -v -i warn | tee "$parts/$name.log"
  local status=${PIPESTATUS[0]}
  if ((status == 124)); then
    echo "$name stopped at its time limit of $limit s" | tee -a "$parts/$name.log"
  elif ((status != 0)); then
    echo "$name exited with status $status" | tee -a "$parts/$name.log"
  fi
  echo "$name" >>"$parts/order"
  collect
}

largest() {  # largest JSON: the largest batch the bench estimated for its train step, or nothing
  python3 -c 'import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r.get("largest_batch_estimate")]
print(rows[0]["largest_batch_estimate"] if rows else "")' "$1" 2>/dev/null
}

# pan_smp vs SMP eager at batch 16, train and forward, with the profile of our train step.
run smp 150 --model=pan_smp --batch=16 --what=train,forward --peer=eager \
  --profile_dir="$parts/profile"
# The paper's model (deep stem, 128-wide decoder).
run pan 90 --model=pan --batch=16 --what=train --peer=none
# torch.compile peer (its compile is slow, so it runs alone).
run compile 120 --model=pan_smp --batch=16 --what=train --peer=compile --nojax --peak_tflops=1
# The largest batch that fits, from XLA's memory plan of the batch-16 step (bench.largest_batch).
batch=$(largest "$parts/smp.json")
if [[ -n $batch ]]; then
  run batch_smp 100 --model=pan_smp --batch="$batch" --what=train --peer=none
fi
# 1×1 convolutions as cuDNN convolutions instead of matmuls (the default since the first H200
# run): the A/B of that choice on this GPU.
run pointwise 80 --model=pan_smp --batch=16 --what=train --peer=none --pointwise_conv=conv
batch=$(largest "$parts/pan.json")
if [[ -n $batch ]]; then
  run batch_pan 100 --model=pan --batch="$batch" --what=train --peer=none
fi
