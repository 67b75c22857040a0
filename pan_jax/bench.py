"""Throughput benchmark: the real train step and forward pass, side by side with SMP in PyTorch.

    python -m pan_jax.bench --model=pan_smp --backbone=resnet101 --batch=16 --crop=512 \
        --dtype=bfloat16 --peer=eager,compile --json=bench.json

Synthetic batches live on the device, so this measures the model and the step, not the input
pipeline, and needs neither tfds nor grain. Reported per setting: compile time (time to the first
step), the median step time over `--steps` timed samples after `--warmup` (each sample
dispatches `--steps_per_sample` steps before it waits, as training does), images/s, the FLOPs
per image of the convolutions and matrix products (`pan_jax.flops`), MFU against
`--peak_tflops` or the measured matmul rate of one device in the compute dtype (`--dtype`),
times the devices a row ran on (ours: all of them, batch split; the peer: one), and peak device
memory (ours: the process's high-water mark so far). The peer is
`segmentation_models_pytorch.PAN` with the same backbone, batch and crop: fp32 on CPU, bf16
autocast with channels_last and cuDNN's autotuner on GPU, eager and with torch.compile; for
`pan_smp` its MFU uses our FLOP count (the same network), and only `pan_smp` gets ratios.
`--profile_dir` traces each of our measurements and prints where its time goes (op_profile).
`--batch=16,max` then trains at the largest batch that XLA's memory plan of the batch-16 step
says fits. The table ends with the speed goals of docs/benchmarks.md next to the figures
(`pan_jax.bench_report`, which also prints a `--json` file as that file's markdown).
Flag values are checked when parsed (--what, --peer and --batch are comma lists); a measurement
that fails is reported as an error row and the others still run, and the exit status is 1 when
none succeeded.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from pan_jax import bench_report, flops, models, op_profile, sharding, train
from pan_jax.models import layers

FLAGS = flags.FLAGS
WHATS = ("train", "forward")
PEERS = ("eager", "compile", "none")


def _comma_list_of(choices: Sequence[str]) -> Callable[[list[str]], bool]:
    """A validator for a list flag: one or more of `choices`, each once."""

    def check(values: list[str]) -> bool:
        unknown = [value for value in values if value not in choices]
        if len(set(values)) != len(values):
            raise flags.ValidationError(f"each of {', '.join(choices)} at most once")
        if not values or unknown:
            # absl puts "flag --NAME=VALUE: " in front of the message.
            raise flags.ValidationError(
                f"expected a comma list of {', '.join(choices)}"
                + (f", not {', '.join(unknown)}" if unknown else "")
            )
        return True

    return check


LARGEST = "max"  # in --batch: the largest batch the previous batch's train step says fits


def _check_batches(values: list[str]) -> bool:
    numbers = values[:-1] if values and values[-1] == LARGEST else values
    if not numbers or not all(v.isascii() and v.isdigit() and int(v) > 0 for v in numbers):
        raise flags.ValidationError(
            f"expected positive integers, e.g. 16 or 8,16, optionally then {LARGEST} (16,{LARGEST})"
        )
    return True


def _something_to_measure(values: dict[str, Any]) -> bool:
    if not values["jax"] and all(peer == "none" for peer in values["peer"]):
        raise flags.ValidationError("--nojax with --peer=none measures nothing")
    return True


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the bench's flags in `flag_values` (tests parse them into a FlagValues of their own).

    --what, --peer and --batch stay comma lists (`--what=train,forward`, as launch/bench_gpu.sh
    passes them) and are checked when parsed: a typo must not measure something else under its
    name, or nothing at all.
    """
    flags.DEFINE_enum(
        "model",
        "pan_smp",
        list(models.MODEL_NAMES),
        "Model name (pan_jax.models).",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "backbone", "resnet101", list(models.BACKBONE_NAMES), "Backbone.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "batch",
        ["16"],
        f"Batch sizes (global): N or a comma list, optionally ending in {LARGEST}: the largest "
        "batch that fits, estimated from XLA's memory plan of the previous batch's train step "
        f"(e.g. 16,{LARGEST}; our train step only, within --device_memory_gb).",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "device_memory_gb",
        0.0,
        f"Device memory to fit --batch={LARGEST} into, in GiB (0: what JAX may allocate on the "
        "device, by default 75% of it; CPUs report no limit). E.g. 58.5, JAX's share of an "
        "H100's 78 GiB, while running on an H200.",
        lower_bound=0.0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer("crop", 512, "Square input size.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_enum(
        "dtype",
        "auto",
        ["auto", "bfloat16", "float32"],
        "Compute dtype (auto: bfloat16 on accelerators, float32 on CPUs, where the peer runs in "
        "float32).",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "peer", ["eager"], f"PyTorch peers: {', '.join(PEERS)}.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "jax", True, "Measure pan_jax (--nojax: the PyTorch peers only).", flag_values=flag_values
    )
    flags.DEFINE_list(
        "what", list(WHATS), f"A comma list of: {', '.join(WHATS)}.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "steps", 20, "Timed repetitions (median reported).", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "steps_per_sample",
        0,
        "Steps dispatched back to back per timed repetition, waiting once at the end, as the "
        "training loop keeps the device busy while the host dispatches the next step "
        "(0: on accelerators 5 up to batch 16, then fewer, down to 2 from batch 27 on; 1 on "
        "CPUs, where the host dispatches nothing ahead of work).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "warmup",
        3,
        "Untimed repetitions after compilation.",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "peak_tflops",
        0.0,
        "Device peak for MFU; 0 = measure a --dtype matmul.",
        lower_bound=0.0,
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "bn_moments",
        "one_pass",
        ["one_pass", "two_pass"],
        "How BatchNorm reads the activations for its training statistics "
        "(models.layers.BATCHNORM_ONE_PASS): to compare them.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "time_init",
        False,
        "Also time a training run's initialisation (train.create_state: the model's compiled "
        "init, on the host's CPU where there are accelerators, and then on the devices for "
        "comparison; the measurements themselves start from a host-filled state).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "json", None, "Write every figure to this JSON file.", flag_values=flag_values
    )
    flags.DEFINE_float(
        "budget_s",
        0.0,
        "Skip remaining measurements after this many seconds (0: no limit).",
        lower_bound=0.0,
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "deadline_s",
        0.0,
        "When this run will be killed, in seconds from its start (a time-boxed device call; 0: "
        "never): the largest-batch row, whose time its batch row predicts, is skipped where it "
        "would not end before, rather than killed with nothing recorded.",
        lower_bound=0.0,
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "pointwise_conv",
        "matmul",
        ["matmul", "conv"],
        "How our 1×1 convolutions lower (models.layers.POINTWISE_AS_MATMUL): to compare them.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "profile_dir",
        None,
        "Trace 3 steps of each pan_jax measurement with jax.profiler into this directory and "
        "print where the time goes (kinds of XLA op, Flax modules, the longest ops).",
        flag_values=flag_values,
    )
    flags.register_validator(
        "json",
        lambda path: path is None or os.path.isdir(os.path.dirname(os.path.abspath(path))),
        message="--json: no such directory to write the file into",
        flag_values=flag_values,
    )
    flags.register_validator("what", _comma_list_of(WHATS), flag_values=flag_values)
    flags.register_validator("peer", _comma_list_of(PEERS), flag_values=flag_values)
    flags.register_validator("batch", _check_batches, flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["jax", "peer"], _something_to_measure, flag_values=flag_values
    )


define_flags()

NUM_CLASSES = 21
_STARTED = time.perf_counter()


def paper_optimizer_config(steps: int = 30_000) -> SimpleNamespace:
    """The optimizer fields of configs/default.py, without ml_collections."""
    return SimpleNamespace(
        num_train_steps=steps,
        warmup_steps=0,
        learning_rate=4e-3,
        poly_power=0.9,
        momentum=0.9,
        weight_decay=1e-4,
        decay_bn_and_bias=True,
        decoder_lr_multiplier=1.0,
    )


def median_time(
    dispatch: Callable[[], Any],
    wait: Callable[[], Any],
    steps: int,
    warmup: int,
    steps_per_sample: int = 1,
) -> float:
    """Median seconds per step of `steps` samples, each `steps_per_sample` dispatches and one
    wait for the device (after `warmup` waited dispatches)."""
    for _ in range(warmup):
        dispatch()
        wait()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(steps_per_sample):
            dispatch()
        wait()
        times.append((time.perf_counter() - start) / steps_per_sample)
    return statistics.median(times)


def steps_per_sample(batch: int = 16) -> int:
    """Steps per timed sample: enough that the host's dispatch between samples (about 5 ms per
    step on an H200 at batch 16) weighs little, few where a step takes long (large batches)."""
    if FLAGS.steps_per_sample:
        return FLAGS.steps_per_sample
    return default_steps_per_sample(batch, jax.devices()[0].platform)


def default_steps_per_sample(batch: int, platform: str) -> int:
    if platform == "cpu":
        return 1
    return min(5, max(2, 80 // batch))


def progress(message: str) -> None:
    """A time-stamped line on stderr: a run cut by a time limit shows where its time went."""
    print(f"[bench {time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _peak_memory_gb() -> float:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def largest_batch(
    step_peak_bytes: float, state_bytes: float, batch: int, limit_bytes: float, multiple: int
) -> int:
    """The largest multiple of `multiple` whose train step fits `limit_bytes` with 10% to spare.

    A linear fit through one compiled step: the train state is fixed, the rest (the batch, the
    activations kept for the backward pass, the workspace) grows with the batch.
    """
    per_image = (step_peak_bytes - state_bytes) / batch
    fits = int((0.9 * limit_bytes - state_bytes) // per_image)
    return max(fits // multiple * multiple, 0)


def _compiled_memory(compiled, state_bytes: float, batch: int) -> dict:
    """XLA's own memory plan of the step, and from it the largest batch the device holds."""
    try:
        analysis = compiled.memory_analysis()
        # XLA:CPU's peak leaves the temporaries out (the step's working memory): the sum of
        # the buffers counts them, and on GPUs does not exceed the peak by much.
        buffers = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes
        )
        step_peak = float(max(analysis.peak_memory_in_bytes, buffers))
    except Exception:  # not every backend reports it
        return {}
    out = {
        "compiled_peak_gb": step_peak / 2**30,
        "compiled_temp_gb": float(analysis.temp_size_in_bytes) / 2**30,
        "state_gb": state_bytes / 2**30,
    }
    limit = FLAGS.device_memory_gb * 2**30 or (jax.local_devices()[0].memory_stats() or {}).get(
        "bytes_limit"
    )
    if limit:  # None on CPUs: host memory is not the device's to plan with
        devices = jax.device_count()  # the state is replicated, the batch split
        per_device = largest_batch(step_peak, state_bytes, batch // devices, limit, 8)
        out["device_memory_gb"] = limit / 2**30
        out["largest_batch_estimate"] = per_device * devices
    return out


def _maybe_profile(run: Callable[[], None], compiled, name: str) -> dict:
    """{"profile": ...} when --profile_dir is set: a trace of 3 steps, reduced to op times."""
    if not FLAGS.profile_dir:
        return {}
    directory = os.path.join(FLAGS.profile_dir, f"{FLAGS.model}_{FLAGS.backbone}_{name}")
    try:
        report = op_profile.profile(run, compiled.as_text(), directory, steps=3)
    except Exception as error:  # no profiler on this machine must not cost the timings
        return {"profile_error": f"{type(error).__name__}: {str(error)[:300]}"}
    print(op_profile.format_report(report), flush=True)
    report["ops"] = report["ops"][:40]  # the JSON keeps the longest; the trace has them all
    return {"profile": report}


def measure_matmul_tflops(dtype: str, size: int) -> float:
    """Achieved matmul TFLOP/s on the first device in `dtype`: the MFU denominator by default.

    On random values: constant ones draw less power, and a GPU then clocks higher than it
    holds on real work (an inflated peak, a deflated MFU).
    """
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: x @ y)
    results = []  # timed as the steps are: the rate is the MFU's denominator
    # A second of products first: an idle GPU clocks low (345 of 1980 MHz on an H200), and a
    # low denominator would inflate every MFU.
    warm_until = time.perf_counter() + 1.0
    while time.perf_counter() < warm_until:
        jax.block_until_ready(matmul(a, a))

    def wait():
        jax.block_until_ready(results)
        results.clear()

    seconds = median_time(lambda: results.append(matmul(a, a)), wait, 10, 3, steps_per_sample())
    return 2 * size**3 / seconds / 1e12


def _count_flops(fn: Callable, *args: Any) -> float:
    try:
        return flops.count(fn, *args)
    except Exception as error:  # counted after the timing, which a failure must not cost
        progress(f"no FLOP count: {type(error).__name__}: {str(error)[:300]}")
        return float("nan")


@functools.cache
def _model_and_state(
    model_name: str, backbone: str, dtype: str
) -> tuple[models.SegmentationModel, optax.GradientTransformation, train.TrainState]:
    """The model, the paper's optimizer and a train state, replicated on the mesh.

    Made once per model, and filled on the host (`models.random_variables`) rather than by the
    model's compiled init, which took about a minute for ResNet-101 on an H200, as long as the
    train step's compile: the step's speed does not depend on the values. The cached state
    stays on the device: device peaks include it (0.32 GB for ResNet-101).
    """
    model = models.create(
        model_name, num_classes=NUM_CLASSES, backbone=backbone, dtype=jnp.dtype(dtype)
    )
    optimizer = train.create_optimizer(paper_optimizer_config())
    start = time.perf_counter()
    state = jax.jit(
        functools.partial(train.state_from_variables, optimizer=optimizer),
        out_shardings=sharding.replicated(sharding.create_mesh()),
    )(models.random_variables(model))
    jax.block_until_ready(state)
    progress(f"initialised {model_name} in {time.perf_counter() - start:.1f} s")
    return model, optimizer, state


def _time_and_profile(
    dispatch: Callable[[], None],
    wait: Callable[[], None],
    steps: int,
    warmup: int,
    compiled: Any,
    batch: int,
    name: str | None,
) -> tuple[float, dict]:
    """The median seconds of one step, and its profile when --profile_dir asks for one (and
    `name` names it)."""
    seconds = median_time(dispatch, wait, steps, warmup, steps_per_sample(batch))

    def run():
        dispatch()
        wait()

    return seconds, _maybe_profile(run, compiled, name) if name else {}


def time_train_init(model_name: str, backbone: str, dtype: str, on_host: bool | None) -> float:
    """Seconds `train.create_state` takes (compile and run), as a training run pays them."""
    model, optimizer, _ = _model_and_state(model_name, backbone, dtype)
    start = time.perf_counter()
    state = train.create_state(
        model,
        optimizer,
        jax.random.key(0),
        sharding.replicated(sharding.create_mesh()),
        on_host=on_host,
    )
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    where = {None: "", True: " on the host", False: " on the devices"}[on_host]
    progress(f"train.create_state{where} of {model_name} took {seconds:.1f} s")
    del state
    return seconds


def time_train_inits(report: dict, save: Callable[[], None]) -> None:
    """`train_init_s`: a training run's init as it runs it (on an accelerator, on the host's
    CPU); on an accelerator also `train_init_on_devices_s`, the devices' own, for comparison.
    Each is saved as soon as it is known: a part cut by its time limit keeps what it has."""
    placements = [("train_init_s", None)]
    if jax.default_backend() != "cpu":
        placements.append(("train_init_on_devices_s", False))
    for key, on_host in placements:
        if FLAGS.budget_s and time.perf_counter() - _STARTED > FLAGS.budget_s:
            print(f"skipped {key}: over --budget_s", flush=True)
            return
        try:
            report[key] = time_train_init(FLAGS.model, FLAGS.backbone, FLAGS.dtype, on_host)
        except Exception as error:  # e.g. out of memory: the rows above still stand
            error_key = key.removesuffix("_s") + "_error"
            report[error_key] = f"{type(error).__name__}: {str(error)[:300]}"
        save()


def jax_train(
    model_name: str,
    backbone: str,
    batch: int,
    crop: int,
    dtype: str,
    steps: int,
    warmup: int,
    profiled: bool = True,
) -> dict:
    """The real training step (`train.make_train_step`) on a synthetic device-resident batch
    (and its profile, where --profile_dir and `profiled` ask for one)."""
    model, optimizer, initial_state = _model_and_state(model_name, backbone, dtype)
    state = jax.tree.map(jnp.copy, initial_state)  # the step donates (deletes) its input state
    mesh = sharding.create_mesh()
    state_sharding = sharding.replicated(mesh)
    rng = np.random.default_rng(0)
    host = {  # what the input pipeline ships: uint8 crops, normalized in the step
        "image": rng.integers(0, 256, (1, batch, crop, crop, 3), np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (1, batch, crop, crop), np.uint8),
        "image_size": np.full((1, batch, 2), crop, np.int32),
    }
    device_batch = sharding.global_batch(host, sharding.batch_sharding(mesh, 2))
    step = train.make_train_step(model, optimizer, mesh, state_sharding)
    key = jax.random.key(1)
    state_bytes = float(sum(leaf.nbytes for leaf in jax.tree.leaves(state)))  # before donation
    state_shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), state)
    start = time.perf_counter()
    lowered = step.lower(state, device_batch, key)
    compiled = lowered.compile()
    state, metrics = compiled(state, device_batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    progress(f"compiled and ran the first step in {compile_s:.1f} s")
    memory = _compiled_memory(compiled, state_bytes, batch)  # not part of the time to first step
    holder = [state, metrics]

    def dispatch():
        holder[:] = compiled(holder[0], device_batch, key)

    def wait():
        jax.block_until_ready(holder[1])

    seconds, profile = _time_and_profile(
        dispatch, wait, steps, warmup, compiled, batch, f"train_b{batch}" if profiled else None
    )
    return {
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "flops_per_image": _count_flops(step, state_shapes, device_batch, key) / batch,
        "peak_memory_gb": _peak_memory_gb(),
        **memory,
        **profile,
    }


def jax_forward(
    model_name: str, backbone: str, batch: int, crop: int, dtype: str, steps: int, warmup: int
) -> dict:
    model, _, state = _model_and_state(model_name, backbone, dtype)
    images = jax.device_put(  # split over the devices as the train step's batch is
        np.random.default_rng(0).standard_normal((batch, crop, crop, 3)).astype(np.float32),
        sharding.batch_sharding(sharding.create_mesh()),
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    lowered = forward.lower(variables, images)
    compiled = lowered.compile()
    compiled(variables, images).block_until_ready()
    compile_s = time.perf_counter() - start
    progress(f"compiled and ran the first forward pass in {compile_s:.1f} s")
    outputs = []

    def dispatch():
        outputs.append(compiled(variables, images))

    def wait():
        jax.block_until_ready(outputs)
        outputs.clear()

    seconds, profile = _time_and_profile(
        dispatch, wait, steps, warmup, compiled, batch, f"forward_b{batch}"
    )
    return {
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "flops_per_image": _count_flops(forward, variables, images) / batch,
        **profile,
    }


def torch_peer(
    what: str,
    backbone: str,
    batch: int,
    crop: int,
    dtype: str,
    compiled: bool,
    steps: int,
    warmup: int,
) -> dict:
    """segmentation_models_pytorch's PAN: SGD step (or forward) in eager mode or torch.compile."""
    import segmentation_models_pytorch as smp
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # Tuned convolution algorithms, as XLA autotunes its own.
    torch.backends.cudnn.benchmark = True
    model = smp.PAN(encoder_name=backbone, encoder_weights=None, classes=NUM_CLASSES).to(device)
    images = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, crop, crop), device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    bf16 = dtype == "bfloat16" and cuda  # CPU rows stay float32: see docs/benchmarks.md
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=4e-3, momentum=0.9, weight_decay=1e-4)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=255)
        loss.backward()
        optimizer.step()

    def forward_step():
        model.eval()
        with torch.no_grad(), autocast:
            forward(images)

    fn = train_step if what == "train" else forward_step
    start = time.perf_counter()
    fn()
    sync()
    compile_s = time.perf_counter() - start
    seconds = median_time(fn, sync, steps, warmup, steps_per_sample(batch))
    result = {
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "dtype": "bfloat16 autocast, channels_last" if bf16 else "float32",
        "torch": torch.__version__,
        "segmentation_models_pytorch": smp.__version__,
    }
    if cuda:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_dtype(flag: str, on_cpu: bool) -> str:
    """--dtype, with `auto` resolved: float32 on CPUs (as the peer runs there), else bfloat16."""
    if flag != "auto":
        return flag
    return "float32" if on_cpu else "bfloat16"


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "jax_device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv) -> int:
    """Runs the measurements; exit status 1 when none of them succeeded."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Compile times are part of the report: never load them from a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    on_cpu = jax.devices()[0].platform == "cpu"
    FLAGS.dtype = compute_dtype(FLAGS.dtype, on_cpu)
    arg_names = (
        "model", "backbone", "batch", "crop", "dtype", "peer", "what", "steps", "warmup",
        "steps_per_sample", "pointwise_conv", "bn_moments", "time_init", "device_memory_gb",
    )  # fmt: skip
    report: dict[str, Any] = {
        "machine": machine(),
        "args": {name: FLAGS[name].value for name in arg_names},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "results": [],
    }
    layers.POINTWISE_AS_MATMUL = FLAGS.pointwise_conv == "matmul"
    layers.BATCHNORM_ONE_PASS = FLAGS.bn_moments == "one_pass"
    # 8192³ saturates a GPU or TPU; on a CPU it would take minutes, and 2048³ is as fast per FLOP.
    peak = FLAGS.peak_tflops or measure_matmul_tflops(FLAGS.dtype, 2048 if on_cpu else 8192)
    report["peak_tflops"] = peak
    report["peak_source"] = "--peak_tflops" if FLAGS.peak_tflops else f"{FLAGS.dtype} matmul"
    ours_flops: dict[tuple[str, int], float] = {}  # the peer computes the same FLOPs as pan_smp

    def save():
        if FLAGS.json:  # whole or not at all: a time limit may kill the process mid-write
            partial = f"{FLAGS.json}.partial"
            with open(partial, "w") as f:
                json.dump(report, f, indent=2)
            os.replace(partial, FLAGS.json)

    def skip(name: str, what: str, batch: int | str, why: str) -> None:
        print(f"skipped {name} {what} batch {batch}: {why}", flush=True)
        report["results"].append({"impl": name, "what": what, "batch": batch, "skipped": why})
        save()

    def record(name: str, what: str, batch: int, fn: Callable[[], dict]) -> None:
        if FLAGS.budget_s and time.perf_counter() - _STARTED > FLAGS.budget_s:
            skip(name, what, batch, "over --budget_s")
            return
        progress(f"{name} {what} batch {batch}")
        try:
            result = fn()
        except Exception as error:  # a peer that fails (OOM, no compiler) must not stop the rest
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        if name.startswith("pan_jax") and "flops_per_image" in result:
            ours_flops[(what, batch)] = result["flops_per_image"]
        flops = result.get("flops_per_image")
        if flops is None and FLAGS.model == "pan_smp":
            flops = ours_flops.get((what, batch))
        if flops and "images_per_s" in result:
            # Ours runs on every device, the peer on one; `peak` is one device's.
            devices = jax.device_count() if name.startswith("pan_jax") else 1
            result["mfu"] = flops * result["images_per_s"] / (peak * 1e12 * devices)
        entry = {"impl": name, "what": what, "batch": batch, **result}
        report["results"].append(entry)
        print(json.dumps(entry), flush=True)  # first: the figure stands whatever save meets
        save()

    steps, warmup, crop = FLAGS.steps, FLAGS.warmup, FLAGS.crop
    batches = [int(b) for b in FLAGS.batch if b != LARGEST]
    for batch in batches:
        for what in FLAGS.what:
            jax_fn = jax_train if what == "train" else jax_forward
            if FLAGS.jax:
                record(
                    f"pan_jax {FLAGS.model}",
                    what,
                    batch,
                    lambda jax_fn=jax_fn, batch=batch: jax_fn(
                        FLAGS.model, FLAGS.backbone, batch, crop, FLAGS.dtype, steps, warmup
                    ),
                )
            for peer in FLAGS.peer:
                if peer == "none":
                    continue
                if what == "train" and batch < 2:  # else a row of torch's ValueError
                    skip(
                        f"smp torch {peer}",
                        what,
                        batch,
                        "torch's BatchNorm trains on 2 or more values per channel, and FPA's "
                        "global branch has one per image: batch 2 or more",
                    )
                    continue
                record(
                    f"smp torch {peer}",
                    what,
                    batch,
                    lambda peer=peer, what=what, batch=batch: torch_peer(
                        what,
                        FLAGS.backbone,
                        batch,
                        crop,
                        FLAGS.dtype,
                        peer == "compile",
                        steps,
                        warmup,
                    ),
                )
    if FLAGS.batch[-1] == LARGEST:
        record_largest_batch(report, batches[-1], record, skip)
    # After the rows: on an H200 it took about a minute, which a time-boxed run must not take
    # from the measurements.
    if FLAGS.time_init and FLAGS.jax:
        time_train_inits(report, save)
    bench_report.print_table(report)
    bench_report.print_goals([report])
    save()
    if "train_init_s" in report:
        print(f"train.create_state (a training run's init): {report['train_init_s']:.1f} s")
    if "train_init_on_devices_s" in report:
        print(f"  the same on the devices: {report['train_init_on_devices_s']:.1f} s")
    if not any(bench_report.measured(r) for r in report["results"]):
        # A bench that measured nothing must not pass for one that did (scripts, CI).
        print(
            "error: no measurement succeeded: each one failed or was skipped (see above)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def record_largest_batch(
    report: dict,
    estimated_at: int,
    record: Callable[[str, str, int, Callable[[], dict]], None],
    skip: Callable[[str, str, int | str, str], None],
) -> None:
    """Our train step at the largest batch that XLA's memory plan of the step at batch
    `estimated_at` says fits: the estimate checked by a run (an out-of-memory is its row's
    error). The peers and the forward pass are not measured there, nor is it profiled (the
    profile of a smaller batch shows the same kernels)."""
    name = f"pan_jax {FLAGS.model}"
    tried = [
        r
        for r in report["results"]
        if (r["impl"], r["what"], r["batch"]) == (name, "train", estimated_at)
    ]
    rows = [r for r in tried if bench_report.measured(r)]
    estimate = rows[0].get("largest_batch_estimate") if rows else None
    if not tried:
        why = f"no train row at batch {estimated_at} to estimate it from (--what=train)"
    elif not rows:
        failed = "failed" if "error" in tried[0] else "was skipped"
        why = f"the train row at batch {estimated_at}, to estimate it from, {failed}"
    elif "compiled_peak_gb" not in rows[0]:
        why = "XLA reported no memory plan of the step to estimate it from"
    elif estimate is None:
        why = "no device memory limit to fit it into (set --device_memory_gb)"
    elif estimate <= estimated_at:
        why = f"batch {estimated_at} is already the largest that fits (estimate: {estimate})"
    else:
        why = ""
    if not why and FLAGS.deadline_s:
        needed = largest_batch_seconds(rows[0], estimated_at, estimate)
        left = FLAGS.deadline_s - (time.perf_counter() - _STARTED)
        if needed > left:
            why = (
                f"batch {estimate} would take about {needed:.0f} s (from the row at batch "
                f"{estimated_at}), {max(left, 0):.0f} s are left before --deadline_s"
            )
    if why:
        skip(name, "train", LARGEST, why)
        return
    print(f"largest batch: {estimate}, from the memory plan at batch {estimated_at}", flush=True)

    def measure() -> dict:
        args = (FLAGS.model, FLAGS.backbone, estimate, FLAGS.crop, FLAGS.dtype)
        measured = jax_train(*args, FLAGS.steps, FLAGS.warmup, profiled=False)
        return {**measured, "largest_batch_from": estimated_at}

    record(name, "train", estimate, measure)


def largest_batch_seconds(row: dict, batch: int, largest: int) -> float:
    """About how long the largest-batch row takes, from the row at `batch`: a compile (a little
    longer at a larger batch), the warm-up and timed steps (time proportional to the batch), and
    10 s for the FLOP count and memory plan."""
    steps = FLAGS.warmup + FLAGS.steps * steps_per_sample(largest)
    return 1.25 * row["compile_s"] + steps * row["step_s"] * largest / batch + 10.0


if __name__ == "__main__":
    app.run(main)
