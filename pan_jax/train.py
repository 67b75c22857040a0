"""Training: the train state, the paper's optimizer, the sharded train step, and the loop.

`train_and_evaluate(config, workdir)` is the job `python -m pan_jax.main` runs. The step is
`jax.jit` over a mesh with the batch sharded on `data` and the state replicated, so BatchNorm
statistics are global (SyncBN) and the gradient all-reduce is XLA's. Everything of a run lives
in `workdir`: `config.json`, `checkpoints/`, TensorBoard events and `metrics.jsonl`.

This module imports neither tfds nor grain at the top, so the benchmark can use the real
train step on machines that have only jax, flax and optax.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax import lax

from pan_jax import checkpointing, compile_ahead, models, normalization, sharding, summary
from pan_jax import flops as flops_lib
from pan_jax.config_errors import ConfigError

if TYPE_CHECKING:  # the benchmark runs this module where ml_collections is not installed
    import ml_collections
    from etils import epath

IGNORE_LABEL = 255


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree of arrays (checkpointed whole)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------- model & optimizer


def model_spec(config: ml_collections.ConfigDict) -> checkpointing.ModelSpec:
    """The JSON-able description of the model a config trains (stored with every checkpoint).

    Overrides left None take the model's default. One that only other models take (a config
    file's PAN widths after `--config.model.name=fcn`) is dropped with a warning; one that no
    model takes stays, for `models.create` to refuse."""
    overrides = config.model.overrides.to_dict() if config.model.get("overrides") else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "dtype" in overrides:  # a spec describes parameters; inference would take it as its dtype
        raise ConfigError(
            f"config.model.overrides.dtype={overrides['dtype']!r}: the compute dtype is "
            "config.model.dtype (the overrides describe the model's parameters)"
        )
    try:
        applicable = models.valid_overrides(config.model.name, overrides)
    except ValueError as error:  # an unknown model name
        raise ConfigError(f"config.model: {error}") from None
    ignored = sorted(k for k in overrides if k in models.OVERRIDE_TYPES and k not in applicable)
    if ignored:
        logging.warning(
            "model %r%s does not take these config.model.overrides, ignored: %s",
            config.model.name,
            models.switched_off(config.model.name, overrides, set(ignored)),
            ", ".join(f"{k}={overrides.pop(k)!r}" for k in ignored),
        )
    return {
        "name": config.model.name,
        "backbone": config.model.backbone,
        "num_classes": int(config.data.num_classes),
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
    }


def create_model(
    config: ml_collections.ConfigDict, spec: checkpointing.ModelSpec | None = None
) -> models.SegmentationModel:
    """The model of `config` (or of its already computed `model_spec`), in its compute dtype."""
    spec = model_spec(config) if spec is None else spec
    try:
        return checkpointing.model_from_spec(spec, dtype=jnp.dtype(config.model.dtype))
    except ValueError as error:  # an unknown backbone, a model option out of range
        raise ConfigError(f"config.model: {error}") from None


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The paper's poly schedule, `lr·(1 − t/T)^0.9`, after an optional linear warmup."""
    total, warmup = int(config.num_train_steps), int(config.warmup_steps)
    poly = optax.polynomial_schedule(
        init_value=config.learning_rate,
        end_value=0.0,
        power=config.poly_power,
        transition_steps=max(total - warmup, 1),
    )
    if warmup == 0:
        return poly
    ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
    return optax.join_schedules([ramp, poly], [warmup])


def _is_backbone(path: tuple[str, ...]) -> bool:
    return path[0] == "backbone"


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """PyTorch's `SGD(lr, momentum, weight_decay)`: decay added to the gradient before momentum.

    `decay_bn_and_bias=True` decays every parameter as PyTorch does by default; False decays only
    conv kernels. `decoder_lr_multiplier` scales the learning rate of everything but the backbone
    (the common 10× for freshly initialised heads).
    """
    schedule = learning_rate_schedule(config)

    def decay_mask(params):
        if config.decay_bn_and_bias:
            return jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda p: p.ndim > 1, params)

    def sgd(scale: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, decay_mask),
            optax.sgd(lambda step: scale * schedule(step), momentum=config.momentum),
        )

    if config.decoder_lr_multiplier == 1.0:
        return sgd(1.0)

    def labels(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: "backbone" if _is_backbone(k) else "decoder" for k in flat}
        )

    return optax.multi_transform(
        {"backbone": sgd(1.0), "decoder": sgd(config.decoder_lr_multiplier)}, labels
    )


def optimizer_layout(config: ml_collections.ConfigDict) -> str:
    """What the structure of `create_optimizer`'s state depends on, as the config field that
    sets it: a checkpoint restores only into a run of the same layout (stored with it, checked
    on resume). One SGD for all parameters, or one each for the backbone and the decoder."""
    return "decoder_lr_multiplier" + ("=1" if config.decoder_lr_multiplier == 1.0 else "!=1")


def init_state(
    model: models.SegmentationModel,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int,
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
    return state_from_variables(variables, optimizer)


def state_from_variables(variables: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """The train state at step 0 of given variables (initialised, converted or host-filled)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(params),
    )


# Initialisation runs once, yet compiling it takes as long as the train step: ResNet-101's is
# hundreds of random fills (56,557 HLO instructions; about a minute on an H200). Unoptimised
# code is fast enough for it: XLA:CPU compiles ResNet-18's in 2.5 s instead of 7.9 (+0.8 s to
# run), ResNet-101's in 13 s instead of 20; parameters differ from optimised code's by rounding.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _initializer(
    model: models.SegmentationModel, optimizer: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """rng -> the initial train state (the parameters do not depend on the input size)."""
    return functools.partial(init_state, model, optimizer, image_size=model.min_input_size)


def create_state(
    model: models.SegmentationModel,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    state_sharding: jax.sharding.Sharding,
    *,
    on_host: bool | None = None,
) -> TrainState:
    """`init_state`, compiled with few optimisations, placed on `state_sharding`.

    `on_host`: compute it on the host's CPU and copy it to the accelerators. By default (None)
    a single process with accelerators does so: XLA:CPU compiles and runs PAN-ResNet-101's init
    in 8.4–8.8 s on 2 cores, where XLA:GPU took about a minute on an H200 (at its default
    optimisation level; bench `--time_init` measures both). Several processes initialise on
    their devices, which run the same program everywhere; the hosts' CPUs, not always of one
    kind, could round the random draws differently in each replica.
    """
    if on_host is None:
        on_host = _init_on_host_by_default(state_sharding)
    if not on_host:
        return _run_init(model, optimizer, rng, state_sharding)
    cpu = jax.local_devices(backend="cpu")[0]
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    state = _run_init(model, optimizer, jax.device_put(rng, cpu), on_cpu)
    return jax.device_put(state, state_sharding)


def _init_on_host_by_default(state_sharding: jax.sharding.Sharding) -> bool:
    if jax.process_count() > 1 or all(d.platform == "cpu" for d in state_sharding.device_set):
        return False
    try:
        jax.local_devices(backend="cpu")
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return False
    return True


def _run_init(
    model: models.SegmentationModel,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    state_sharding: jax.sharding.Sharding,
) -> TrainState:
    create = jax.jit(_initializer(model, optimizer), out_shardings=state_sharding)
    lowered = create.lower(rng)
    try:
        compiled = lowered.compile(compiler_options=_INIT_COMPILER_OPTIONS)
    except Exception as error:  # a backend that refuses the option compiles as usual
        logging.warning("initialisation compiled with XLA's defaults: %s", error)
        compiled = lowered.compile()
    return compiled(rng)


# ----------------------------------------------------------------------------- loss & step


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per-pixel cross-entropy over valid pixels, number of valid pixels); 255 ignored.

    Labels of any integer type (the input pipeline ships uint8)."""
    logits, labels = logits.astype(jnp.float32), labels.astype(jnp.int32)
    valid = labels != IGNORE_LABEL
    safe_labels = jnp.where(valid, labels, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    losses = jnp.where(valid, log_z - label_logits, 0.0)
    return jnp.sum(losses), jnp.sum(valid).astype(jnp.float32)


def unroll_micro_steps(micro_steps: int) -> int:
    """How many micro-batches of gradient accumulation one loop iteration runs.

    One, except on CPU: in a loop, one micro-batch's activations are freed before the next
    one's are made; unrolled, XLA may keep them all, i.e. the full batch's memory (4
    micro-batches of ResNet-18: 2.4× the loop's peak). XLA:CPU runs convolutions inside a loop
    ~20× slower.
    """
    return micro_steps if jax.default_backend() == "cpu" else 1


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: models.SegmentationModel,
    optimizer: optax.GradientTransformation,
    unroll: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch of shape (micro_steps, batch, H, W, ...).

    Images are normalized float32, or the input pipeline's uint8 crops with their `image_size`
    (normalized here, on the device). The loss is the cross-entropy averaged over the valid
    pixels of the whole global batch. With micro_steps > 1 (gradient accumulation) gradients of
    the micro-batches are summed before the update, so the update equals the full batch's,
    except that BatchNorm sees each micro-batch on its own.
    """
    rng = jax.random.fold_in(rng, state.step)

    def micro_step(carry, micro_batch):
        grads, loss, count, batch_stats = carry
        images, index = micro_batch["image"], micro_batch["index"]
        if images.dtype == jnp.uint8:  # the input pipeline's crops, normalized here
            images = normalization.normalize_crops(images, micro_batch["image_size"])

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(rng, index)},
            )
            loss, count = cross_entropy_sum(logits, micro_batch["label"])
            return loss, (count, updates["batch_stats"])

        (micro_loss, (micro_count, batch_stats)), micro_grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (grads, loss + micro_loss, count + micro_count, batch_stats), None

    micro_steps = batch["image"].shape[0]
    zero = jnp.zeros((), jnp.float32)
    carry = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, state.batch_stats)
    micro_batches = {**batch, "index": jnp.arange(micro_steps)}
    unroll = unroll or unroll_micro_steps(micro_steps)
    if unroll >= micro_steps:  # straight-line code (lax.scan keeps a loop even of one step)
        for index in range(micro_steps):
            carry, _ = micro_step(carry, {k: v[index] for k, v in micro_batches.items()})
    else:
        carry, _ = lax.scan(micro_step, carry, micro_batches, unroll=unroll)
    grads, loss, count, batch_stats = carry
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    metrics = {
        "loss": loss / count,
        "valid_pixel_fraction": count / np.prod(batch["label"].shape),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    return new_state, metrics


def make_train_step(
    model: models.SegmentationModel,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_sharding: Any,
) -> Callable:
    """The jitted, sharded step: `(state, batch, rng) -> (state, metrics)`, state donated."""
    step = functools.partial(train_step, model=model, optimizer=optimizer)
    return jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def _abstract_step_batch(
    batch_spec: dict[str, tuple[tuple[int, ...], Any]], micro_steps: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """What `host_batch_for_step` makes of a batch of `batch_spec`, as shape-dtype structs."""
    return {
        key: jax.ShapeDtypeStruct((micro_steps, shape[0] // micro_steps, *shape[1:]), dtype)
        for key, (shape, dtype) in batch_spec.items()
    }


def _placed(tree: Any, placement: jax.sharding.Sharding) -> Any:
    """Shape-dtype structs of `tree` with the sharding its arrays will have."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)


def host_batch_for_step(batch: dict[str, np.ndarray], micro_steps: int) -> dict[str, np.ndarray]:
    """(B, ...) rows of this process → (micro_steps, B / micro_steps, ...)."""
    out = {}
    for key in batch:
        value = np.asarray(batch[key])
        if value.shape[0] % micro_steps:
            raise ValueError(
                f"per-process batch of {value.shape[0]} does not split into "
                f"grad_accum_steps={micro_steps} micro-batches"
            )
        out[key] = value.reshape(micro_steps, value.shape[0] // micro_steps, *value.shape[1:])
    return out


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Remembers a SIGTERM or the first Ctrl-C (SIGINT), so the loop can save at the current
    step and exit cleanly; a second Ctrl-C interrupts (a save in flight is still finished)."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        if jax.process_count() == 1:  # with several, JAX's preemption service owns SIGTERM
            self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        again = " (Ctrl-C again stops sooner)" if signum == signal.SIGINT else ""
        logging.warning("%s: saving a checkpoint at the current step, then exiting%s", name, again)
        self.requested = name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _flops_per_image(
    step_fn: Callable, args: tuple, config: ml_collections.ConfigDict
) -> float | None:
    """The train step's FLOPs per image (logged once): its convolutions and matrix products."""
    try:
        flops = flops_lib.count(step_fn, *args) / config.batch_size
    except Exception as error:  # a count that fails must not cost the run
        logging.warning("no FLOP count: %s: %s", type(error).__name__, error)
        return None
    if not math.isfinite(flops) or flops <= 0:
        return None
    logging.info("train step: %.1f GFLOP per image", flops / 1e9)
    return flops


class _StepTrace:
    """A `jax.profiler` trace of steps `first`..`last` of the real run, input pipeline included.

    Process 0 takes it, where TensorBoard's profile tab finds it
    (`WORKDIR/tensorboard/plugins/profile`), and logs it reduced as the benchmark does
    (`op_profile`): time by kind of XLA op and by Flax module, and the summed op time against
    the wall time of the traced steps, whose gap is the device waiting for the host or the
    input (on CPUs thunks overlap, so the sum can exceed the wall time). A profiler that fails
    costs a warning, never the run.
    """

    def __init__(self, directory: epath.Path, first: int, last: int) -> None:
        self.directory, self.first, self.last = str(directory), first, last
        self.started: float | None = None

    def before_step(self, step: int) -> None:
        # Process 0 only: the one that summarizes it, and the processes of one host would
        # write the same file (jax names it by host and second).
        if step != self.first or self.last < self.first or jax.process_index() != 0:
            return
        try:
            jax.profiler.start_trace(self.directory)
            self.started = time.perf_counter()
        except Exception as error:  # e.g. another trace is running
            logging.warning("profile not taken: %s: %s", type(error).__name__, error)

    def after_step(self, step: int, step_fn: Callable, *args: Any) -> None:
        """After step `step` was dispatched with `args` (the new state, the batch, the rng)."""
        if self.started is None or step != self.last:
            return
        jax.block_until_ready(args[0])
        wall = (time.perf_counter() - self.started) / (self.last - self.first + 1)
        self.stop()
        if jax.process_index() != 0:
            return
        try:
            from pan_jax import op_profile

            hlo = step_fn.lower(*args).compile().as_text()  # the compiled step: no recompile
            report = op_profile.summarize(self.directory, hlo, self.last - self.first + 1)
        except Exception as error:
            logging.warning("profile not summarized: %s: %s", type(error).__name__, error)
            return
        logging.info(
            "profile of steps %d-%d in %s: %.1f ms wall per step, XLA ops %.1f ms (%.0f%%)\n%s",
            self.first,
            self.last,
            self.directory,
            wall * 1e3,
            report["op_ms_per_step"],
            100 * report["op_ms_per_step"] / 1e3 / wall,
            op_profile.format_report(report),
        )

    def stop(self) -> None:
        if self.started is not None:
            self.started = None
            jax.profiler.stop_trace()

    def __enter__(self) -> _StepTrace:
        return self

    def __exit__(self, *exc) -> None:  # a run that ends or fails inside the traced steps
        self.stop()


def _check_config(config: ml_collections.ConfigDict) -> int:
    """Checks the fields a run would otherwise trip over later, deep inside; returns the
    per-process batch size."""
    if config.batch_size < 1 or config.grad_accum_steps < 1:
        raise ConfigError(
            f"config.batch_size={config.batch_size} and config.grad_accum_steps="
            f"{config.grad_accum_steps}: both must be at least 1"
        )
    if not 0 < config.data.min_scale <= config.data.max_scale:
        raise ConfigError(
            f"config.data.min_scale={config.data.min_scale} and config.data.max_scale="
            f"{config.data.max_scale}: expected 0 < min_scale <= max_scale"
        )
    for field in ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
        if config[field] < 1:  # 0 would divide by zero, or (keep) delete every checkpoint
            raise ConfigError(f"config.{field}={config[field]}: expected at least 1")
    if config.num_train_steps < 0 or config.eval_every_steps < 0:
        raise ConfigError(
            f"config.num_train_steps={config.num_train_steps} and config.eval_every_steps="
            f"{config.eval_every_steps}: expected at least 0 (eval_every_steps=0: no evaluation)"
        )
    optimizer_ranges = (  # where SGD with the poly schedule is what the run means
        ("learning_rate", lambda v: v >= 0, ">= 0"),
        ("warmup_steps", lambda v: v >= 0, ">= 0"),
        ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("poly_power", lambda v: v >= 0, ">= 0"),
        ("decoder_lr_multiplier", lambda v: v >= 0, ">= 0"),
    )
    for field, fits, expected in optimizer_ranges:
        if field in config and not fits(config[field]):
            raise ConfigError(f"config.{field}={config[field]}: expected {expected}")
    # float16 is not offered: without loss scaling, the gradients of the head's weights (sums
    # over every pixel of the batch) overflow its 65,504 at the paper's 512² crops.
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(
            f"config.model.dtype={config.model.dtype!r}: expected 'float32' or 'bfloat16' (the "
            "compute dtype; parameters stay float32)"
        )
    devices = jax.device_count()
    if config.batch_size % devices:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the {devices} devices"
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    per_process = config.batch_size // jax.process_count()
    if per_process % config.grad_accum_steps or (
        (config.batch_size // config.grad_accum_steps) % devices
    ):
        raise ConfigError(
            f"config.batch_size={config.batch_size} with grad_accum_steps="
            f"{config.grad_accum_steps} leaves micro-batches that do not split over "
            f"{devices} devices and {jax.process_count()} processes"
        )
    return per_process


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the workdir's latest checkpoint) and evaluates periodically. The
    run holds the workdir's lock (`checkpointing.WorkdirLock`) from its creation to the end."""
    with checkpointing.WorkdirLock(workdir) as lock:
        return _train_and_evaluate(config, workdir, lock)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, lock: checkpointing.WorkdirLock
) -> TrainState:
    from pan_jax.data import pipeline

    started = time.perf_counter()
    per_process_batch = _check_config(config)
    pipeline.dataset_spec(config.data.name)
    spec = model_spec(config)
    model = create_model(config, spec)
    if config.data.crop_size < model.min_input_size:
        raise ConfigError(
            f"config.data.crop_size={config.data.crop_size}: this model needs crops of at least "
            f"{model.min_input_size} px (its output stride {model.backbone.output_stride} × the "
            f"{model.min_input_size // model.backbone.output_stride} px its decoder needs at the "
            "top of the backbone)"
        )
    from pan_jax import evaluate

    # As mmseg: config.eval's whole/slide inference, single scale without flip; multi-scale +
    # flip is for --mode=eval, which reads the same section (checked even with no evaluations).
    eval_options = {**evaluate.eval_options(config.get("eval")), "scales": (1.0,), "flip": False}
    optimizer = create_optimizer(config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    # Traced now: a bad option value fails before the dataset is built and the workdir written.
    abstract_state = jax.eval_shape(_initializer(model, optimizer), init_rng)
    if config.model.get("pretrained") and not checkpointing.has_checkpoints(workdir):
        # Before the workdir is written and the dataset built (minutes for VOC): a bad name or
        # no network fails now. A resumed run needs no weights, and so no network.
        from pan_jax import convert

        fetch = functools.partial(
            convert.fetch_pretrained, config.model.pretrained, config.model.pretrained_kind, model
        )
        try:
            sharding.process_zero_first(fetch, "pretrained weights fetched")
        except (FileNotFoundError, ValueError) as error:  # no such file, an unknown kind
            raise ConfigError(
                f"config.model.pretrained={config.model.pretrained!r} "
                f"(pretrained_kind={config.model.pretrained_kind!r}): {error}"
            ) from None
    checkpointing.refuse_model_directory(workdir)  # in seconds, not after a dataset build
    # The data next: a run refused for its data creates no workdir (the manager makes
    # checkpoints/ in it).
    sharding.process_zero_first(
        functools.partial(pipeline.prepare, config.data), "dataset prepared"
    )
    manager = checkpointing.create_manager(workdir, config)  # makes the workdir
    # Before the checkpoints are read: those of a live run may change as they are.
    sharding.process_zero_first(lock.acquire, "workdir locked")
    layout = optimizer_layout(config)
    workdir_path = checkpointing.prepare_workdir(workdir, config, spec, manager, layout)

    mesh = sharding.create_mesh()
    state_sharding = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh, 2)
    eval_images = 0
    if config.eval_every_steps:  # checked now, not after the first eval_every_steps of training
        eval_images = pipeline.num_examples(config.data, config.data.eval_split)
        logging.info(
            "evaluating every %d steps on the %d images of %s",
            config.eval_every_steps,
            eval_images,
            config.data.eval_split,
        )
    step_fn = make_train_step(model, optimizer, mesh, state_sharding)
    ahead = contextlib.nullcontext()
    if (manager.latest_step() or 0) < config.num_train_steps:
        logging.info("compiling the train step while the state and the input pipeline start")
        batch_spec = pipeline.train_batch_spec(config.data, config.batch_size)
        ahead = compile_ahead.CompileAhead(
            step_fn,
            _placed(abstract_state, state_sharding),
            _placed(_abstract_step_batch(batch_spec, config.grad_accum_steps), batch_sharding),
            step_rng,
        )
    with ahead:
        state = checkpointing.restore_or_none(manager, abstract_state, state_sharding)
        if state is None:
            state = create_state(model, optimizer, init_rng, state_sharding)
            if config.model.get("pretrained"):
                state = _load_pretrained(state, model, config, state_sharding)
            else:
                logging.info("training from scratch: config.model.pretrained is empty")
        start_step = int(state.step)
        if start_step >= config.num_train_steps:  # no step to run: the record is this run's
            checkpointing.write_run_record(workdir_path, config, spec)
        train_iter = iter(
            pipeline.train_dataset(
                config.data,
                per_process_batch_size=per_process_batch,
                seed=config.seed,
                start_batch=start_step,  # one batch per step
            )
        )
        if start_step < config.num_train_steps:  # the pipeline's start-up overlaps the compile
            train_iter = itertools.chain([next(train_iter)], train_iter)
    logging.info(
        "model %s/%s, %s parameters, start at step %d of %d",
        config.model.name,
        config.model.backbone,
        f"{models.parameter_count(state.params):,}",
        start_step,
        config.num_train_steps,
    )

    writer = summary.MetricWriter(
        workdir_path, enabled=jax.process_index() == 0, start_step=start_step
    )
    schedule = learning_rate_schedule(config)
    images_per_step = config.batch_size
    pending: list[tuple[int, dict]] = []
    interval_sums: dict[str, float] = {}  # of each metric over the steps since the last log
    interval_steps = 0
    # (step, time) of the last completed step the rate was measured from; device_get of a
    # step's metrics returns when that step is done, so rates are of finished work.
    last_timed: tuple[int, float] | None = None
    flops_per_image: float | None = None  # convolutions and matmuls, known after step 1

    def flush_metrics(step: int, force: bool = False, final: bool = False) -> None:
        """Checks losses one step late, so the host never waits on the step in flight. `final`
        (a stop before the end) also logs the steps since the last log line."""
        nonlocal last_timed, interval_steps
        while pending and (force or pending[0][0] < step):
            done_step, metrics = pending.pop(0)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(values[k])]
            if bad:
                raise NonFiniteLossError(
                    f"{', '.join(f'{k} = {values[k]}' for k in bad)} at step {done_step}; "
                    f"stopping. The last good checkpoint (step {manager.latest_step()}) in "
                    f"{workdir_path} is kept."
                )
            for key, value in values.items():
                interval_sums[key] = interval_sums.get(key, 0.0) + value
            interval_steps += 1
            if (
                done_step % config.log_every_steps == 0
                or done_step == config.num_train_steps
                or (final and not pending)
            ):
                # Means over the interval, as flax's examples log: one step's loss is noise.
                values = {k: v / interval_steps for k, v in interval_sums.items()}
                interval_sums.clear()
                interval_steps = 0
                now = time.perf_counter()
                values["learning_rate"] = float(schedule(done_step - 1))
                speed = "? img/s  ETA ?"  # the first step (compilation) has no rate
                if last_timed is not None and done_step > last_timed[0]:
                    rate = (done_step - last_timed[0]) * images_per_step / (now - last_timed[1])
                    remaining = (config.num_train_steps - done_step) * images_per_step / rate
                    values["images_per_second"] = rate
                    speed = f"{rate:.1f} img/s  "
                    if flops_per_image:
                        per_device = rate * flops_per_image / jax.device_count() / 1e12
                        values["tflops_per_device"] = per_device
                        speed += f"{per_device:.3g} TFLOP/s/device  "
                    speed += f"ETA {format_duration(remaining)}"
                writer.write_scalars(done_step, {f"train/{k}": v for k, v in values.items()})
                logging.info(
                    "step %d/%d  loss %.4f  lr %.2e  %s",
                    done_step,
                    config.num_train_steps,
                    values["loss"],
                    values["learning_rate"],
                    speed,
                )
                last_timed = (done_step, now)

    def run_eval(step: int) -> None:
        report = evaluate.evaluate_dataset(
            model,
            state.variables,
            pipeline.eval_dataset(config.data),
            num_classes=config.data.num_classes,
            num_images_hint=evaluate.images_of_this_process(eval_images),
            **eval_options,
        )
        scalars = {"eval/miou": report["miou"], "eval/pixel_accuracy": report["pixel_accuracy"]}
        writer.write_scalars(step, scalars)
        logging.info(
            "eval at step %d: mIoU %.2f %% over %d images",  # in %, as --mode=eval and the paper
            step,
            100 * report["miou"],
            report["num_images"],
        )

    # After the step that compiles, so the trace holds steady-state steps only.
    trace = _StepTrace(
        workdir_path / "tensorboard",
        first=start_step + 2,
        last=min(start_step + 1 + int(config.get("profile_steps", 0)), config.num_train_steps),
    )

    def save_and_exit(step: int, signal_name: str | None) -> None:
        """Ends a preempted run with its state at `step` saved (launchers grep the line)."""
        if step and manager.latest_step() != step:
            checkpointing.save(manager, step, state, spec, force=True, optimizer_layout=layout)
        manager.wait_until_finished()
        if step:
            logging.warning(
                "%s: checkpoint at step %d written, exiting", signal_name or "preempted", step
            )
        else:
            logging.warning("%s before the first step: nothing to save, exiting", signal_name)

    try:
        with _Preemption() as preemption, trace:
            if _eval_owed(workdir_path, start_step, config):
                logging.info("step %d was checkpointed, never evaluated: evaluating it", start_step)
                run_eval(start_step)
            step = start_step
            stopped = False
            if step < config.num_train_steps:
                logging.info("first step ...")
            while step < config.num_train_steps:
                if preemption.requested:  # came after the last step's check, or during an eval
                    flush_metrics(step, force=True, final=True)  # and checked: never save a NaN
                    save_and_exit(step, preemption.requested)
                    break
                host_batch = next(train_iter)
                if config.get("log_batch_digests"):
                    writer.write_json(step + 1, {"batch_digest": _digest(host_batch)})
                    _log_example_digests(workdir_path, step + 1, host_batch)
                batch = sharding.global_batch(
                    host_batch_for_step(host_batch, config.grad_accum_steps), batch_sharding
                )
                trace.before_step(step + 1)
                state, metrics = step_fn(state, batch, step_rng)
                step += 1
                trace.after_step(step, step_fn, state, batch, step_rng)
                if step == start_step + 1:  # compilation: not part of any rate
                    jax.block_until_ready(state)
                    # Only now: a run that failed before its first step (its data, its
                    # compile, its memory) leaves the record of the run that owns the workdir.
                    checkpointing.write_run_record(workdir_path, config, spec)
                    logging.info(
                        "first step done %.1f s after train_and_evaluate started",
                        time.perf_counter() - started,
                    )
                    flops_per_image = _flops_per_image(step_fn, (state, batch, step_rng), config)
                    last_timed = (step, time.perf_counter())
                pending.append((step, metrics))
                at_end = step == config.num_train_steps
                stop = preemption.requested or manager.reached_preemption(step)
                must_save = at_end or stop or step % config.checkpoint_every_steps == 0
                # Never checkpoint a NaN state.
                flush_metrics(step, force=must_save, final=bool(stop))
                if stop:
                    save_and_exit(step, preemption.requested)
                    stopped = True
                    break
                if must_save:
                    checkpointing.save(
                        manager, step, state, spec, force=True, optimizer_layout=layout
                    )
                    logging.info("saved checkpoint at step %d", step)
                if _is_eval_step(step, config):
                    flush_metrics(step, force=True)  # this step's rate must not include the eval
                    run_eval(step)
                    last_timed = (step, time.perf_counter())  # evaluation is not throughput
            flush_metrics(step, force=True)
            # Still under the signal handlers: a SIGTERM now must not kill the last save.
            manager.wait_until_finished()
            # Launchers look for this line (tpu_pod.sh deletes the slice), so not where the run
            # stopped at its last step with that step's evaluation still owed to a resume.
            if step == config.num_train_steps and not (stopped and _is_eval_step(step, config)):
                logging.info("training finished at step %d", step)
    finally:  # an error or a second Ctrl-C must not leave the last save half written
        manager.wait_until_finished()
    manager.close()
    writer.close()
    return state


def _is_eval_step(step: int, config: ml_collections.ConfigDict) -> bool:
    every = config.eval_every_steps
    return bool(every) and (step % every == 0 or step == config.num_train_steps)


def _eval_owed(workdir: epath.Path, step: int, config: ml_collections.ConfigDict) -> bool:
    """Whether the run restored at `step`, an eval step, has no evaluation of it in its
    metrics.jsonl: the run before stopped (preempted, killed) between its save and its eval.
    Process 0 reads the file and tells the others, which must evaluate with it."""
    if step == 0 or not _is_eval_step(step, config):
        return False
    owed = False
    if jax.process_index() == 0:
        owed = step not in _evaluated_steps(workdir / "metrics.jsonl")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        owed = bool(multihost_utils.broadcast_one_to_all(np.int32(owed)))
    return owed


def _evaluated_steps(metrics_file: epath.Path) -> set[int]:
    records, _ = summary.read_records(metrics_file)
    return {record["step"] for record in records if "eval/miou" in record}


def format_duration(seconds: float) -> str:
    """`H:MM:SS` with hours past 24 (a month-long ETA must not wrap around like a clock)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _digest(batch: dict[str, np.ndarray]) -> str:
    import hashlib

    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()


def _log_example_digests(workdir: Any, step: int, batch: dict[str, np.ndarray]) -> None:
    """Every process appends its per-example digests to `example_digests.<process>.jsonl`
    (with config.log_batch_digests), so a test can see that the hosts' shards are disjoint."""
    rows = len(batch["image"])
    digests = [_digest({k: v[i] for k, v in batch.items()}) for i in range(rows)]
    with (workdir / f"example_digests.{jax.process_index()}.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "examples": digests}) + "\n")


def _load_pretrained(
    state: TrainState,
    model: models.SegmentationModel,
    config: ml_collections.ConfigDict,
    state_sharding: Any,
) -> TrainState:
    """Backbone (or whole-model) weights: a torchvision/timm/SMP file, a model directory, or
    "imagenet" (the ImageNet weights of the backbone's variant, downloaded once)."""
    from pan_jax import convert

    variables, _ = convert.load_pretrained(  # which logs what it loaded and what not
        jax.device_get(state.variables),
        config.model.pretrained,
        config.model.pretrained_kind,
        model=model,
    )
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    return jax.device_put(state, state_sharding)
