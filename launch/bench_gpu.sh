#!/usr/bin/env bash
# The GPU benchmark suite of docs/benchmarks.md: PAN-R101 at 512², bf16, against SMP in PyTorch.
# Usage: [BENCH_PARTS="smp pan"] bash launch/bench_gpu.sh OUTDIR
# The parts (BENCH_PARTS, default all, in order of importance: smp pan forward bn_moments
# pointwise compile) run one after another, each time-boxed, all within BENCH_BUDGET_S seconds
# (default 560: one 10-minute device call, of the 15 minutes a session's device time allows, the
# start included); a part that would not get 90 s is skipped. Each part is one process; on an
# H200 each step compile took about a minute. The smp and pan parts train at batch 16 and then
# at the largest batch that XLA's memory plan of the batch-16 step says fits (`--batch=16,max`),
# in the same process, unless the batch-16 row predicts that it would not end within the part's
# time (a skipped row, with the reason); the pan part then times a training run's init (on the
# host's CPU, as training does, then on the GPU for comparison). The forward part times the
# forward pass against SMP's. The torch.compile peer was measured in the ninth session. A second
# call, on the still warm machine, takes what the first skipped, e.g.
# `BENCH_PARTS="forward bn_moments"`.
# The torch peer needs segmentation_models_pytorch, which the GPU image lacks: carry its wheel
# (`pip download segmentation_models_pytorch==0.6.0 --no-deps`; its dependencies are there) and
# install it first. A call whose parts include smp, forward or compile refuses to start without
# it, or without a GPU that torch sees, rather than spend itself on rows without their peer. The A/B parts compare with the smp part's train row of
# the same call, or else run our default step first. BENCH_BASELINE=previous skips that step
# where the device tool says the machine was still warm: the previous call's smp part is then
# the baseline (`python -m pan_jax.bench_report CALL1/bench.json CALL2/bench.json` pairs them).
# The smp and forward parts also trace the training step and the forward pass and print where
# their time goes.
# OUTDIR gets few files, whatever the number of parts (a device call brings back at most 8),
# rewritten after every part so that a cut run still leaves every finished figure:
#   bench.json  every part's JSON under its name;  bench.log  the GPU and every part's output;
#   bench.md  the figures and the goals in markdown (python -m pan_jax.bench_report bench.json);
#   <profile>.xplane.pb.gz and <profile>_hlo.txt.gz  each trace and the compiled step it ran,
#   for `python -m pan_jax.op_profile TRACE --hlo=HLO` (TensorBoard/Perfetto read the trace).
# BENCH_EXTRA_ARGS (e.g. "--backbone=resnet18 --crop=128") is appended to every bench command.
set -uo pipefail
all_parts="smp pan forward bn_moments pointwise compile"
for part in ${BENCH_PARTS:-$all_parts}; do  # a misspelt part must not cost the others' time
  [[ " $all_parts " == *" $part "* ]] || { echo "unknown part $part (expected $all_parts)" >&2; exit 2; }
done
if [[ " ${BENCH_PARTS:-$all_parts} " =~ \ (smp|forward|compile)\  ]]; then  # the torch peer's
  python3 -c '
import jax, torch, segmentation_models_pytorch
assert jax.default_backend() == "cpu" or torch.cuda.is_available(), "torch sees no GPU"
' || { echo "the SMP peer cannot run here (see the top of $0)" >&2; exit 2; }
fi
out=${1:-bench_out}
mkdir -p "$out"
parts=$(mktemp -d)  # each part's own JSON and log
export PYTHONUNBUFFERED=1
read -ra extra <<<"${BENCH_EXTRA_ARGS:-}"
deadline=$((SECONDS + ${BENCH_BUDGET_S:-560}))
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$parts/gpu.log"
# Training compiles its step in a thread while it starts (pan_jax.compile_ahead); that only pays
# if this jax reuses the executable at jit's first call (checked in tests with jax 0.10 on CPU).
timeout 60 python3 - <<'PY' 2>&1 | grep -v -i -e warn -e libtpu | tee -a "$parts/gpu.log"
import logging
import jax, jax.numpy as jnp
from pan_jax import compile_ahead, sharding
mesh = sharding.create_mesh()
state, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
step = jax.jit(lambda s, b: (s + b.mean(), b.sum()), in_shardings=(state, batch),
               out_shardings=(state, state), donate_argnums=0)
s = jax.device_put(jnp.ones((1024,)), state)
b = jax.device_put(jnp.ones((8 * jax.device_count(), 16)), batch)
compiles = []
handler = logging.Handler()
handler.emit = lambda r: compiles.append(r) if "XLA compilation of jit(" in r.getMessage() else 0
logging.getLogger("jax").addHandler(handler)
jax.config.update("jax_log_compiles", True)
structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in (s, b)]
with compile_ahead.CompileAhead(step, *structs):
    pass
step(s, b)
print(f"compile ahead (jax {jax.__version__}): {len(compiles)} compile(s) of the step,",
      "reused" if len(compiles) == 1 else "NOT reused: the first step compiles again")
PY
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
  # The figures and the goals as docs/benchmarks.md tables them.
  python3 -m pan_jax.bench_report "$out/bench.json" >"$out/bench.md" 2>&1 || true  # no rows yet
}

run() {  # run NAME SECONDS ARGS...
  local name=$1 seconds=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 90)); then  # less than one step's compile (about a minute on an H200)
    echo "skipped $name: ${left} s left of BENCH_BUDGET_S" | tee "$parts/$name.log"
    echo "$name" >>"$parts/order"
    collect
    return
  fi
  local limit=$((seconds < left ? seconds : left))
  # The bench starts no row after --budget_s, so that it still prints its table and ratios,
  # and no largest-batch row that would not end before it is killed (its clock starts after
  # Python and jax load).
  local budget=$((limit - 75)) deadline_s=$((limit - 15))
  timeout "$limit" python3 -m pan_jax.bench --backbone=resnet101 --budget_s="$budget" \
    --deadline_s="$deadline_s" --crop=512 --dtype=bfloat16 --json="$parts/$name.json" "$@" \
    "${extra[@]}" 2>&1 |
    grep -v -i -e warn -e "delay kernel" -e libtpu | tee "$parts/$name.log"  # autotuner noise
  local status=${PIPESTATUS[0]}
  if ((status == 124)); then
    echo "$name stopped at its time limit of $limit s" | tee -a "$parts/$name.log"
  elif ((status != 0)); then
    echo "$name exited with status $status" | tee -a "$parts/$name.log"
  fi
  echo "$name" >>"$parts/order"
  collect
}

baseline() {  # the A/Bs' other side: the smp part's train row when this call ran it (the same
  # program), else the default step once, since another call may have got another machine.
  # BENCH_BASELINE=previous: the previous call's smp part, where the device tool's reply says
  # this call found the machine warm (the same machine); it saves a step compile.
  [[ -s $parts/smp.json || -s $parts/baseline.json || ${BENCH_BASELINE:-} == previous ]] ||
    run baseline 120 --model=pan_smp --batch=16 --what=train --peer=none
}

for part in ${BENCH_PARTS:-$all_parts}; do
  case $part in
  smp)  # pan_smp vs SMP eager training at batch 16, and where our step's time goes; then our
    # train step at the largest batch that fits
    run smp 280 --model=pan_smp --batch=16,max --what=train --peer=eager \
      --profile_dir="$parts/profile" ;;
  pan)  # the paper's model (deep stem, 128-wide decoder) at batch 16 and the largest batch,
        # and a training run's init time (train_init_s, on the host; train_init_on_devices_s,
        # on the GPU)
    run pan 260 --model=pan --batch=16,max --what=train --peer=none --time_init ;;
  forward)  # pan_smp vs SMP eager inference at batch 16, and where our forward's time goes
    run forward 120 --model=pan_smp --batch=16 --what=forward --peer=eager \
      --profile_dir="$parts/profile" ;;
  compile)  # the torch.compile peer (its compile is slow, so it runs alone)
    run compile 150 --model=pan_smp --batch=16 --what=train --peer=compile --nojax \
      --peak_tflops=1 ;;
  bn_moments)  # BatchNorm statistics in two passes over the activations instead of one (our
    # default): A/B against our default step on this machine (see baseline)
    baseline
    run bn_moments 120 --model=pan_smp --batch=16 --what=train --peer=none --bn_moments=two_pass ;;
  pointwise)  # 1×1 convolutions as cuDNN convolutions instead of matmuls (our default): A/B
    # likewise
    baseline
    run pointwise 170 --model=pan_smp --batch=16 --what=train --peer=none --pointwise_conv=conv ;;
  esac
done
