"""Training: the optimizer equals PyTorch's, sharding changes nothing, runs resume exactly."""

import asyncio
import gc
import json
import logging as std_logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from etils import epath

from configs import demo
from pan_jax import checkpointing, compile_ahead, compile_cache, convert, models, sharding, train
from pan_jax import flops as flops_lib
from pan_jax.config_errors import ConfigError
from pan_jax.data import pipeline, synthetic
from pan_jax.normalization import normalize
from tests.helpers import HUB_RESNET18, resnet18_safetensors

REPO = Path(__file__).resolve().parents[1]
# The in-process runs of `tiny_config` compile the same train and eval steps.
pytestmark = pytest.mark.usefixtures("reuse_compiled_programs")


def tiny_config(data_dir: str, **fields) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.name = "pan_smp"
    config.model.overrides = ml_collections.ConfigDict({"decoder_channels": 16})
    config.data.name = "pan_synthetic/tiny"
    config.data.data_dir = data_dir
    config.batch_size = 2
    config.num_train_steps = 4
    config.warmup_steps = 0
    config.learning_rate = 0.01
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 0
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    config = tiny_config(path)
    pipeline.prepare(config.data)
    return path


def cli_flags(config_overrides: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in config_overrides.items()]


def run_main(workdir: Path, data_dir: str, *extra: str, wait: bool = True, **overrides):
    fields = {
        "model.name": "pan_smp",
        "model.overrides.decoder_channels": 16,
        "model.overrides.pyramid_features": 1,
        "data.name": "pan_synthetic/tiny",
        "data.data_dir": data_dir,
        "batch_size": 2,
        "warmup_steps": 0,
        "log_every_steps": 1,
        "eval_every_steps": 0,
        "log_batch_digests": True,
        **overrides,
    }
    command = [
        sys.executable,
        "-m",
        "pan_jax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        *cli_flags(fields),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own cache, in its workdir
    process = subprocess.Popen(  # a session of its own: signals to its group spare pytest
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        output, _ = process.communicate(timeout=600)
        return process.returncode, output
    return process


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    process.kill()
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(lines[-40:])}")


def digests(workdir: Path) -> dict[int, str]:
    """The last digest logged for each step (a killed run may have logged steps it lost)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "batch_digest" in record:
            out[record["step"]] = record["batch_digest"]
    return out


def assert_trees_equal(a, b, atol=0.0):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("warmup", [0, 4])
def test_optimizer_equals_torch_sgd_with_poly_schedule(warmup):
    # With warmup (the demo's 50 steps), the poly part was never compared: a poly over all the
    # steps, or no ramp, went unseen.
    config = demo.get_config()
    steps = 10
    config.learning_rate, config.num_train_steps, config.warmup_steps = 0.1, steps, warmup
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
    }
    gradients = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
        for _ in range(steps)
    ]

    def factor(step: int) -> float:  # a linear ramp from 0, then poly over the remaining steps
        if step < warmup:
            return step / warmup
        return (1 - (step - warmup) / (steps - warmup)) ** 0.9

    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in weights.items()}
    sgd = torch.optim.SGD(torch_params.values(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    poly = torch.optim.lr_scheduler.LambdaLR(sgd, factor)
    for grads in gradients:
        for key, param in torch_params.items():
            param.grad = torch.from_numpy(grads[key])
        sgd.step()
        poly.step()

    optimizer = train.create_optimizer(config)
    params = jax.tree.map(jnp.asarray, weights)
    opt_state = optimizer.init(params)
    for grads in gradients:
        updates, opt_state = optimizer.update(jax.tree.map(jnp.asarray, grads), opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
    for key in weights:
        np.testing.assert_allclose(
            params[key], torch_params[key].detach().numpy(), rtol=1e-6, atol=1e-7
        )
    schedule = train.learning_rate_schedule(config)
    np.testing.assert_allclose([schedule(s) for s in range(steps + 1)], [
        0.1 * factor(s) for s in range(steps + 1)
    ], rtol=1e-6, atol=1e-9)  # fmt: skip


def test_decay_mask_and_decoder_multiplier():
    config = demo.get_config()
    config.warmup_steps, config.weight_decay = 0, 0.5
    config.decay_bn_and_bias, config.decoder_lr_multiplier = False, 10.0
    params = {
        "backbone": {"k": jnp.ones((2, 2)), "b": jnp.ones(2)},
        "head": {"k": jnp.ones((2, 2))},
    }
    optimizer = train.create_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    # With zero gradients only weight decay moves parameters: biases are not decayed, kernels
    # are, and the decoder's learning rate is 10× the backbone's.
    lr = config.learning_rate
    np.testing.assert_allclose(updates["backbone"]["b"], 0.0)
    np.testing.assert_allclose(updates["backbone"]["k"], -lr * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["k"], -10 * lr * 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- the step


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, ".")
    from configs import demo
    from pan_jax import sharding, train
    from pan_jax.models.layers import BatchNorm
    import flax.linen as nn

    config = demo.get_config()
    # FCN: PAN's globally pooled 1×1 BatchNorms amplify float rounding ~1e3× at this batch,
    # which would hide a real difference behind noise (see test_gradient_accumulation...).
    config.model.name, config.model.overrides = "fcn", {"stem": "torchvision"}
    # The paper's learning rate (demo.py's 0.02 would scale the update rounding 5×).
    config.num_train_steps, config.warmup_steps, config.learning_rate = 10, 0, 4e-3
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.standard_normal((1, 8, 128, 128, 3)).astype(np.float32),
         "label": rng.integers(0, 13, (1, 8, 128, 128)).astype(np.int32)}
        for _ in range(2)
    ]

    def run(devices):  # the states: initial, after the first step, after the second
        mesh = sharding.create_mesh(devices)
        state_sharding = sharding.replicated(mesh)
        state = jax.jit(lambda r: train.init_state(model, optimizer, r, 128),
                        out_shardings=state_sharding)(jax.random.key(0))
        step = train.make_train_step(model, optimizer, mesh, state_sharding)
        states = [jax.device_get(state)]
        for batch in batches:
            state, _ = step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh, 2)),
                            jax.random.key(1))
            states.append(jax.device_get(state))
        return states

    eight, one = run(jax.devices()), run(jax.devices()[:1])
    assert len(jax.devices()) == 8
    # Relative to each leaf's magnitude (running variances reach ~10).
    error = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))
                for a, b in zip(jax.tree.leaves((eight[-1].params, eight[-1].batch_stats)),
                                jax.tree.leaves((one[-1].params, one[-1].batch_stats))))
    # SyncBN: after the first step the stem BN's running mean is 0.1 × the full-batch mean of
    # the stem conv's output (it started at 0).
    conv = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False)
    stem = conv.apply({"params": eight[0].params["backbone"]["stem_conv0"]},
                      batches[0]["image"][0])
    mean = np.asarray(eight[1].batch_stats["backbone"]["stem_bn0"]["mean"])
    bn_error = float(np.max(np.abs(mean - 0.1 * np.asarray(stem).mean(axis=(0, 1, 2)))))
    # The init computed on the host and copied onto all 8 devices equals theirs.
    mesh = sharding.create_mesh()
    states = [train.create_state(model, optimizer, jax.random.key(0), sharding.replicated(mesh),
                                 on_host=on_host) for on_host in (True, False)]
    host_init_equal = all(
        np.array_equal(a, b) and a.sharding == b.sharding and len(a.sharding.device_set) == 8
        for a, b in zip(*map(jax.tree.leaves, states)))
    print("RESULT", error, bn_error, host_init_equal)
    """
)


def test_eight_devices_equal_one_device_and_batchnorm_is_global():
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    error, bn_error = map(float, line.split()[1:3])
    assert line.split()[3] == "True"  # train.create_state(on_host=True) over 8 devices
    # Float32 rounding of the two reduction orders, grown by two steps: 0.9e-5 to 4.8e-5 over
    # three data seeds with the two-pass BatchNorm statistics, 2.7e-5 to 4.0e-5 with the one-pass
    # ones. A per-device gradient or BatchNorm would be off by far more (bn_error checks the BN).
    assert error < 1e-4, error
    assert bn_error < 1e-5, bn_error


def test_the_batch_is_split_over_the_devices_along_its_batch_axis():
    # One process computes the same result with any axis split (jit's semantics are global),
    # so the 8-device test could not tell a batch split along its height; across processes
    # each one's rows would be taken for a slice of every image.
    mesh = sharding.create_mesh()
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert sharding.batch_sharding(mesh, 2).spec == jax.sharding.PartitionSpec(None, "data")


def test_create_state_is_init_state_compiled_onto_its_sharding():
    config = tiny_config("unused")
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state_sharding = sharding.replicated(sharding.create_mesh())
    state = train.create_state(model, optimizer, jax.random.key(3), state_sharding)
    expected = jax.jit(lambda r: train.init_state(model, optimizer, r, model.min_input_size))(
        jax.random.key(3)
    )
    leaves, expected_leaves = jax.tree.leaves(state), jax.tree.leaves(expected)
    assert len(leaves) == len(expected_leaves)
    for leaf, expected_leaf in zip(leaves, expected_leaves, strict=True):
        # Unoptimised code rounds differently: a few float32 ulps of the same draws.
        np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-5, atol=1e-6)
        assert leaf.sharding == state_sharding


def test_create_state_on_the_host_equals_it_on_the_devices():
    config = tiny_config("unused")
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state_sharding = sharding.replicated(sharding.create_mesh())
    on_devices = train.create_state(model, optimizer, jax.random.key(3), state_sharding)
    on_host = train.create_state(model, optimizer, jax.random.key(3), state_sharding, on_host=True)
    leaves = jax.tree.leaves(on_host)
    assert len(leaves) == len(jax.tree.leaves(on_devices))
    for leaf, expected in zip(leaves, jax.tree.leaves(on_devices), strict=True):
        np.testing.assert_array_equal(leaf, expected)
        assert leaf.sharding == state_sharding


def test_create_state_initialises_on_the_host_for_one_process_with_accelerators(monkeypatch):
    def devices(platform: str) -> Any:
        return types.SimpleNamespace(device_set=[types.SimpleNamespace(platform=platform)])

    assert train._init_on_host_by_default(devices("gpu"))
    assert train._init_on_host_by_default(devices("tpu"))
    assert not train._init_on_host_by_default(devices("cpu"))  # the same backend: nothing to gain
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    # Each host's CPU would draw the replicas' values: they must be the same everywhere.
    assert not train._init_on_host_by_default(devices("gpu"))
    monkeypatch.setattr(jax, "process_count", lambda: 1)

    def no_cpu_backend(backend=None):
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "local_devices", no_cpu_backend)  # JAX_PLATFORMS=cuda
    assert not train._init_on_host_by_default(devices("gpu"))


def test_create_state_compiles_as_usual_where_the_backend_refuses_the_option(monkeypatch):
    config = tiny_config("unused")
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    monkeypatch.setattr(train, "_INIT_COMPILER_OPTIONS", {"xla_no_such_option": 1})
    state_sharding = sharding.replicated(sharding.create_mesh())
    state = train.create_state(model, optimizer, jax.random.key(3), state_sharding)
    expected = jax.jit(
        lambda r: train.init_state(model, optimizer, r, model.min_input_size),
        out_shardings=state_sharding,
    )(jax.random.key(3))
    for leaf, expected_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(leaf, expected_leaf)


def test_gradient_accumulation_equals_the_full_batch_unrolled_and_in_a_loop():
    config = tiny_config("unused", num_train_steps=10)
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state = train.init_state(model, optimizer, jax.random.key(0), 128)
    rng = np.random.default_rng(1)
    half = {
        "image": rng.standard_normal((2, 128, 128, 3)).astype(np.float32),
        "label": rng.integers(0, 13, (2, 128, 128)).astype(np.int32),
    }
    # Identical micro-batches see the same BatchNorm statistics as their concatenation, so
    # the accumulated update must equal the full-batch update.
    full = {k: np.concatenate([v] * 2)[None] for k, v in half.items()}
    accumulated = {k: np.stack([v] * 2) for k, v in half.items()}

    def step(unroll=None):
        return jax.jit(
            lambda s, b: train.train_step(
                s, b, jax.random.key(0), model=model, optimizer=optimizer, unroll=unroll
            )
        )

    def lowered(batch, unroll=None):
        return step(unroll).lower(state, batch)

    full_state, full_metrics = lowered(full).compile()(state, full)
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    full_updates = [np.asarray(_leaf(full_state.params, p) - v) for p, v in leaves]
    largest = max(float(np.max(np.abs(u))) for u in full_updates)
    temporary_bytes, flops, xla_flops = {}, {}, {}
    for unroll in (2, 1):  # unrolled (CPU), one micro-batch per loop iteration (accelerators)
        program = lowered(accumulated, unroll)
        compiled = program.compile()
        accumulated_state, accumulated_metrics = compiled(state, accumulated)
        # Compare the updates leaf by leaf, relative to each leaf's update size (floored at 1%
        # of the largest update: conv biases before BN have a zero gradient, their update is
        # noise).
        for (path, v), full_update in zip(leaves, full_updates, strict=True):
            update = np.asarray(_leaf(accumulated_state.params, path) - v)
            scale = max(float(np.max(np.abs(full_update))), 1e-2 * largest)
            error = float(np.max(np.abs(full_update - update))) / scale
            assert error < 1e-3, (unroll, jax.tree_util.keystr(path), error)
        np.testing.assert_allclose(full_metrics["loss"], accumulated_metrics["loss"], rtol=1e-6)
        temporary_bytes[unroll] = compiled.memory_analysis().temp_size_in_bytes
        flops[unroll] = flops_lib.count(step(unroll), state, accumulated)
        xla_flops[unroll] = program.cost_analysis()["flops"]
    # The loop keeps one micro-batch's activations; unrolled, XLA kept both.
    assert temporary_bytes[1] < 0.7 * temporary_bytes[2], temporary_bytes
    # Every micro-batch's convolutions count, as in the full batch; XLA's own count sees a
    # loop's body once (and adds elementwise work).
    assert flops[1] == flops[2] == flops_lib.count(step(), state, full)
    assert flops[2] == pytest.approx(xla_flops[2], rel=0.03)
    assert xla_flops[1] == pytest.approx(xla_flops[2] / 2, rel=0.03)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _small_fcn(**fields):
    config = tiny_config("unused", **{"model.name": "fcn", **fields})
    config.model.overrides = ml_collections.ConfigDict({"stem": "torchvision"})
    return config


def test_accumulation_weighs_every_valid_pixel_alike_and_an_ignored_batch_is_no_nan():
    # The accumulation test's micro-batches were identical: a loss averaged over micro-batches
    # rather than over their valid pixels went unseen. A batch of only 255 must not divide 0 by 0.
    config = _small_fcn()
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state = train.init_state(model, optimizer, jax.random.key(0), 64)
    rng = np.random.default_rng(4)
    images = rng.standard_normal((2, 2, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 13, (2, 2, 64, 64)).astype(np.int32)
    labels[0, :, :, :48] = 255  # the first micro-batch keeps a quarter of its pixels

    def whole_batch_loss(params):  # BatchNorm sees each micro-batch on its own, as the step's
        total = count = 0.0
        for micro_images, micro_labels in zip(images, labels, strict=True):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, _ = model.apply(variables, micro_images, train=True, mutable=["batch_stats"])
            micro_total, micro_count = train.cross_entropy_sum(logits, micro_labels)
            total, count = total + micro_total, count + micro_count
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(whole_batch_loss))(state.params)
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, optimizer=optimizer)
    )
    _, metrics = step(state, {"image": images, "label": labels})
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)

    after, metrics = step(state, {"image": images, "label": np.full_like(labels, 255)})
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    no_gradient = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = optimizer.update(no_gradient, state.opt_state, state.params)
    decayed = optax.apply_updates(state.params, updates)  # weight decay alone moves them
    assert_trees_equal(after.params, decayed, atol=1e-7)


def test_dropout_draws_a_new_mask_at_every_step():
    # Nothing ran a model with dropout: the same mask at every step (the step's rng not folded
    # with the step) went unseen.
    config = tiny_config("unused", **{"model.name": "psp"})
    config.model.overrides = ml_collections.ConfigDict(
        {"stem": "torchvision", "decoder_channels": 16, "dropout_rate": 0.5}
    )
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state = train.init_state(model, optimizer, jax.random.key(0), 64)
    rng = np.random.default_rng(5)
    batch = {
        "image": rng.standard_normal((1, 2, 64, 64, 3)).astype(np.float32),
        "label": rng.integers(0, 13, (1, 2, 64, 64)).astype(np.int32),
    }
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, optimizer=optimizer)
    )
    losses = [float(step(state.replace(step=jnp.asarray(n)), batch)[1]["loss"]) for n in (0, 1, 0)]
    assert losses[0] == losses[2] and losses[0] != losses[1]


def test_the_step_normalizes_the_pipelines_uint8_crops_on_the_device():
    # FCN: PAN's globally pooled BatchNorms would amplify the 1-ulp input differences.
    config = tiny_config("unused", **{"model.name": "fcn"})
    config.model.overrides = ml_collections.ConfigDict({"stem": "torchvision"})
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state = train.init_state(model, optimizer, jax.random.key(0), 128)
    record = {
        "image": np.random.default_rng(0).integers(0, 256, (100, 90, 3), np.uint8),
        "label": np.random.default_rng(1).integers(0, 13, (100, 90), np.uint8),
        "file_name": "small",
    }
    crops = [
        pipeline.train_transform(
            record, np.random.default_rng(seed), crop_size=128, min_scale=0.75, max_scale=1.25,
            flip=True, num_classes=13,
        )
        for seed in range(2)
    ]  # fmt: skip
    shipped = {key: np.stack([c[key] for c in crops])[None] for key in crops[0]}
    assert shipped["image"].dtype == np.uint8 and (shipped["image_size"] < 128).any()
    # What the host would have fed: normalized, padding 0 (the mean), int32 labels.
    host = normalize(shipped["image"])
    for index, (h, w) in enumerate(shipped["image_size"][0]):
        host[0, index, h:], host[0, index, :, w:] = 0.0, 0.0
    fed = {"image": host, "label": shipped["label"].astype(np.int32)}
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, optimizer=optimizer)
    )
    (a, metrics_a), (b, metrics_b) = step(state, shipped), step(state, fed)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    assert_trees_equal(a.params, b.params, atol=1e-4)  # updates are ~1e-3; ulps move a few 1e-5


def test_cross_entropy_ignores_255_and_averages_over_valid_pixels():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4, 5)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 5, (2, 3, 4)))
    labels = labels.at[0, 0].set(255)
    total, count = train.cross_entropy_sum(logits, labels)
    reference = torch.nn.functional.cross_entropy(
        torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2),
        torch.from_numpy(np.asarray(labels, np.int64)),
        ignore_index=255,
    )
    assert int(count) == 2 * 3 * 4 - 4
    np.testing.assert_allclose(float(total / count), float(reference), rtol=1e-6)


def test_a_tiny_model_overfits_a_handful_of_images():
    # A long schedule keeps the learning rate near its peak over the 60 steps run here.
    config = tiny_config("unused", num_train_steps=5000, learning_rate=0.05)
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    state = train.init_state(model, optimizer, jax.random.key(0), 128)
    # 256 px: objects large against the decoder's 1/4-resolution output.
    sample = synthetic.SyntheticConfig(name="overfit", image_size=256, void_width=0)
    examples = [synthetic.generate_example(sample, "train", i) for i in range(2)]
    images = normalize(np.stack([image for image, _ in examples]))
    labels = np.stack([mask.reshape(mask.shape[:2]) for _, mask in examples]).astype(np.int32)
    batch = {"image": np.asarray(images, np.float32)[None], "label": labels[None]}
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, optimizer=optimizer)
    )
    for _ in range(60):
        state, metrics = step(state, batch)
    # Training predictions (batch statistics), as the loss sees them.
    logits, _ = model.apply(state.variables, batch["image"][0], train=True, mutable=["batch_stats"])
    predictions = np.asarray(jnp.argmax(logits, -1))
    ious = []
    for c in np.unique(labels):
        intersection = np.sum((predictions == c) & (labels == c))
        union = np.sum((predictions == c) | (labels == c))
        ious.append(intersection / union)
    # 0.30 after 10 steps, 0.89 after 60, 0.92 after 120: the 1/4-resolution output blurs the
    # objects' edges.
    assert np.mean(ious) > 0.85, (np.mean(ious), float(metrics["loss"]))


# ----------------------------------------------------------------------------- the job


def test_main_writes_a_run_and_resumes_exactly_after_a_hard_kill(tmp_path, data_dir):
    # With gradient accumulation: a resume must start at the step's batch, not its first
    # micro-batch's count.
    straight = tmp_path / "straight"
    code, output = run_main(
        straight,
        data_dir,
        num_train_steps=6,
        checkpoint_every_steps=3,
        keep_checkpoints=1,
        grad_accum_steps=2,
    )
    assert code == 0, output[-3000:]
    assert (straight / "config.json").exists() and (straight / "model.json").exists()
    assert list((straight / "tensorboard").iterdir()), "no TensorBoard events"
    assert checkpointing.finished_steps(straight) == [6]  # the last keep_checkpoints kept
    assert "img/s" in output and "ETA" in output
    assert "training finished at step 6" in output  # what launch/tpu_pod.sh waits for
    # Honest throughput: XLA's FLOP count of the step, and the rate it gives per device.
    gflop = float(re.search(r"train step: ([\d.]+) GFLOP per image", output).group(1))
    assert gflop > 0
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "train/images_per_second" in r]
    assert timed and all("train/tflops_per_device" in r for r in timed)
    for r in timed:  # one device: TFLOP/s = img/s × FLOPs per image
        expected = r["train/images_per_second"] * gflop / 1e3
        assert r["train/tflops_per_device"] == pytest.approx(expected, rel=0.05)

    killed = tmp_path / "killed"
    process = run_main(
        killed,
        data_dir,
        wait=False,
        num_train_steps=6,
        checkpoint_every_steps=3,
        grad_accum_steps=2,
    )
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "3").is_dir() and time.time() < deadline:  # finalized, not *.tmp
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The kill may land after the run went on: drop what a kill a moment earlier would not
    # have left, so the resume starts from step 3 whatever the timing.
    for later in checkpoints.iterdir():
        if not later.name.isdigit() or int(later.name) > 3:
            shutil.rmtree(later)
    # What the killed run logged after its checkpoint, and a line the kill cut: the resumed run
    # trains steps 4-6 again and must log them once.
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/loss": 99.0}\n{"step": 5, "train/lo')
    # Resumed with a data worker process (the killed run had none): the pipeline's position is
    # the step, not grain's iterator state, whose format depends on the number of workers.
    code, output = run_main(
        killed,
        data_dir,
        num_train_steps=6,
        checkpoint_every_steps=3,
        log_every_steps=3,
        grad_accum_steps=2,
        **{"data.num_workers": 1},
    )
    assert code == 0, output[-3000:]
    assert "start at step 3" in output
    # Logged every 3 steps, the loss is the mean of the 3 steps' losses (exact resume: the
    # straight run's steps 4-6), not the last step's.
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "train/loss" in r]
    assert logged == sorted(set(logged)) and 99.0 not in [r.get("train/loss") for r in records]
    last = [r for r in records if "train/loss" in r][-1]
    straight_losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert last["step"] == 6
    assert last["train/loss"] == pytest.approx(np.mean([straight_losses[s] for s in (4, 5, 6)]))
    assert last["train/loss"] != pytest.approx(straight_losses[6])
    # The resumed run loaded the killed run's compiled programs from the workdir's cache.
    assert any((killed / compile_cache.DIRECTORY_NAME).iterdir())
    loaded = re.search(r"(\d+) programs loaded from the compilation cache", output)
    assert loaded and int(loaded.group(1)) >= 1, output[-3000:]

    assert digests(killed) == digests(straight)
    assert len(digests(straight)) == 6
    a, _, _ = checkpointing.restore_for_inference(straight)
    b, _, _ = checkpointing.restore_for_inference(killed)
    assert_trees_equal(a, b)


CACHE_SCRIPT = """
import sys, jax, jax.numpy as jnp
from pan_jax import compile_cache
print("directory", compile_cache.enable(sys.argv[1], enabled=sys.argv[2] == "on"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()
print(compile_cache.summary())
"""


def run_cache_script(
    workdir: str, switch: str = "on", cwd: Path = REPO, cache_dir: str | None = None
) -> subprocess.CompletedProcess:
    """CACHE_SCRIPT in a fresh process; `cache_dir` sets JAX_COMPILATION_CACHE_DIR (unset: None)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    command = [sys.executable, "-c", CACHE_SCRIPT, workdir, switch]
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "environment, switch, where",
    [
        (None, "on", "workdir"),  # the default
        (None, "off", None),  # config.compilation_cache=False
        ("", "on", None),  # JAX_COMPILATION_CACHE_DIR= turns it off
        ("elsewhere", "on", "elsewhere"),  # and moves it
    ],
)
def test_compilation_cache_location(tmp_path, environment, switch, where):
    cache_dir = None if environment is None else environment and str(tmp_path / environment)
    outputs = [
        run_cache_script(str(tmp_path / "workdir"), switch, cache_dir=cache_dir) for _ in range(2)
    ]
    expected = {
        "workdir": tmp_path / "workdir" / compile_cache.DIRECTORY_NAME,
        "elsewhere": tmp_path / "elsewhere",
        None: None,
    }[where]
    assert f"directory {expected}" in outputs[0].stdout
    written = list(tmp_path.rglob("*-cache"))
    if expected is None:
        assert not written
        assert "0 programs loaded" in outputs[1].stdout
    else:
        assert written and all(p.parent == expected for p in written)
        assert "0 programs loaded" not in outputs[1].stdout  # the second run loaded them


def test_the_cache_is_found_however_the_workdir_is_spelt(tmp_path):
    """jax hashes the cache's directory into its keys: `--workdir=runs/x` run from the checkout
    and the same workdir given as an absolute path must share programs."""
    spellings = [("workdir", tmp_path), (str(tmp_path / "workdir"), REPO)]
    outputs = [run_cache_script(workdir, cwd=cwd) for workdir, cwd in spellings]
    assert "0 programs loaded" not in outputs[1].stdout, outputs[1].stdout


def test_a_cut_short_cache_entry_is_compiled_and_written_again(tmp_path):
    """A host stopped while jax wrote an entry leaves it empty or cut short; jax never rewrites
    an existing entry, so without `enable`'s clean-up every later start would compile it again."""
    workdir = str(tmp_path / "workdir")
    cache = tmp_path / "workdir" / compile_cache.DIRECTORY_NAME
    first = run_cache_script(workdir)
    whole = {entry: entry.read_bytes() for entry in cache.glob("*-cache")}
    assert whole and f"{len(whole)} programs loaded" in run_cache_script(workdir).stdout
    for cut in (lambda data: data[: len(data) // 2], lambda data: b""):
        for entry, data in whole.items():
            entry.write_bytes(cut(data))
        result = run_cache_script(workdir)
        removed = f"Removed {len(whole)} unreadable entries from the compilation cache {cache}"
        assert removed in result.stderr
        assert all(entry.name in result.stderr for entry in whole)
        assert "Error reading persistent compilation cache" not in result.stderr
        assert result.stdout == first.stdout  # nothing loaded: compiled again
        assert {entry: len(entry.read_bytes()) for entry in whole} == {
            entry: len(data) for entry, data in whole.items()
        }  # and written again
        result = run_cache_script(workdir)
        assert f"{len(whole)} programs loaded" in result.stdout and "Removed" not in result.stderr


def _cut_short_entry() -> bytes:
    """A cache entry in this jax's format, cut after its header (a host stopped mid-write)."""
    from jax._src import compilation_cache as jax_cache

    return jax_cache.compress_executable(b"program")[:4] + b"cut"


def test_a_jax_whose_cache_format_changed_keeps_its_entries(tmp_path, monkeypatch):
    from jax._src import compilation_cache as jax_cache

    own = jax_cache.compress_executable(b"probe")
    (tmp_path / "cut-cache").write_bytes(_cut_short_entry())
    monkeypatch.setattr(jax_cache, "compress_executable", lambda data, level: data)  # new args
    assert compile_cache._remove_unreadable_entries(str(tmp_path)) == []
    assert (tmp_path / "cut-cache").exists()
    monkeypatch.undo()
    # An entry in the other format (zstd where this jax writes zlib, or the reverse) may be
    # whole, from another environment sharing the workdir: it was deleted.
    zstd = own.startswith(compile_cache._ZSTD_MAGIC)
    (tmp_path / "other-cache").write_bytes((b"\x78\x9c" if zstd else b"\x28\xb5\x2f\xfd") + b"..")
    (tmp_path / "cut-in-magic-cache").write_bytes(own[:1])  # cut inside this format's header
    removed = compile_cache._remove_unreadable_entries(str(tmp_path))
    assert removed == ["cut-cache", "cut-in-magic-cache"]
    assert not (tmp_path / "cut-cache").exists() and (tmp_path / "other-cache").exists()


def test_a_zstd_entry_cut_in_its_header_is_removed_and_other_files_are_left(tmp_path, monkeypatch):
    # This environment's jax writes zlib, whose header is one byte: an entry cut inside
    # zstd's four-byte header, and files beside the entries (jax's LRU access times, whose
    # first byte may be anything), were never judged by a test.
    import zlib

    from jax._src import compilation_cache as jax_cache

    magic = compile_cache._ZSTD_MAGIC

    def decompress(data: bytes) -> bytes:
        if not data.startswith(magic):
            raise ValueError("not a zstd frame")
        return zlib.decompress(data[len(magic) :])

    monkeypatch.setattr(jax_cache, "compress_executable", lambda data: magic + zlib.compress(data))
    monkeypatch.setattr(jax_cache, "decompress_executable", decompress)
    whole = magic + zlib.compress(b"program")
    files = {
        "whole-cache": whole,
        "cut-cache": whole[:7],
        "cut-in-magic-cache": magic[:2],
        "zlib-cache": zlib.compress(b"program"),  # another environment's: may be whole
        "whole-atime": whole[:8],  # jax's LRU access time: 8 bytes that may begin like this
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    removed = compile_cache._remove_unreadable_entries(str(tmp_path))
    assert removed == ["cut-cache", "cut-in-magic-cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "whole-atime",
        "whole-cache",
        "zlib-cache",
    ]


def test_a_cache_entry_this_process_cannot_read_is_left(tmp_path, monkeypatch, caplog):
    # Another user's entry in a shared cache, or a flaky mount: not judged cut short, not deleted.
    for name in ("locked-cache", "cut-cache"):
        (tmp_path / name).write_bytes(_cut_short_entry())
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path.name == "locked-cache":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with caplog.at_level(std_logging.WARNING):
        assert compile_cache._remove_unreadable_entries(str(tmp_path)) == ["cut-cache"]
    assert (tmp_path / "locked-cache").exists()
    assert "locked-cache not checked" in caplog.text


def test_only_process_zero_removes_cut_short_cache_entries(tmp_path, monkeypatch):
    # The others may read an entry process 0 is writing: theirs is no judgement of it.
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # this process's cache stays
    monkeypatch.setattr(compile_cache, "_listening", True)
    cache = tmp_path / compile_cache.DIRECTORY_NAME
    cache.mkdir()
    entry = cache / "cut-cache"
    entry.write_bytes(_cut_short_entry())
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert compile_cache.enable(tmp_path) == str(cache)
    assert entry.exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    compile_cache.enable(tmp_path)
    assert not entry.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_at_the_current_step_and_exits_cleanly(tmp_path, data_dir, signum):
    workdir = tmp_path / "run"
    # Ctrl-C in a terminal reaches the whole process group, input workers included.
    workers = 1 if signum == signal.SIGINT else 0
    process = run_main(
        workdir,
        data_dir,
        wait=False,
        num_train_steps=1000,
        checkpoint_every_steps=500,
        log_every_steps=7,
        **{"data.num_workers": workers},
    )
    wait_for_line(process, "step 7/1000")
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 7 <= steps[0] < 1000, steps
    assert f"{signum.name}: checkpoint at step {steps[0]} written" in output
    assert "training finished" not in output  # launch/tpu_pod.sh keeps such a run's slice
    # The steps since the last log line are logged too (not lost with the stop).
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "train/loss" in r][-1]["step"] == steps[0]


def test_only_process_zero_traces(tmp_path, monkeypatch):
    # Every process traced into one file per host and second: the processes of one host
    # (one per GPU) overwrote each other's, and process 0 might summarize another's.
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    trace = train._StepTrace(epath.Path(tmp_path), first=2, last=3)
    trace.before_step(2)
    assert trace.started is None and not any(tmp_path.iterdir())


def test_profile_steps_trace_the_real_run_and_log_where_the_time_goes(tmp_path, data_dir, caplog):
    workdir = tmp_path / "run"
    caplog.set_level("INFO")
    # More steps asked than the run has left: the trace ends with the run, and is summarized.
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=3, profile_steps=5), workdir)
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces  # where TensorBoard's profile tab looks
    (message,) = [r.getMessage() for r in caplog.records if "profile of steps" in r.getMessage()]
    assert message.startswith(f"profile of steps 2-3 in {workdir / 'tensorboard'}:"), message
    wall, ops = re.search(r"([\d.]+) ms wall per step, XLA ops ([\d.]+) ms", message).groups()
    assert float(wall) > 0 and float(ops) > 0
    # The compiled step's HLO names the work: convolutions, forward and backward modules.
    assert "convolution" in message.split("by kind:")[1].split("\n")[0]
    assert "bwd " in message and "backbone/" in message


def test_a_run_fine_tunes_from_another_runs_latest_checkpoint(tmp_path, data_dir):
    """The paper's VOC test protocol: train on train_aug, then fine-tune that model on trainval."""
    first = str(tmp_path / "first")
    trained = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), first)
    fine_tune = tiny_config(data_dir, num_train_steps=1, learning_rate=0.0)
    fine_tune.model.pretrained, fine_tune.model.pretrained_kind = first, "pan_jax"
    started = train.train_and_evaluate(fine_tune, str(tmp_path / "second"))
    assert_trees_equal(started.params, trained.params)  # learning rate 0: the loaded weights

    fine_tune.model.pretrained = str(tmp_path / "nothing_here")
    with pytest.raises(ConfigError, match=r"nothing_here not found \(pan_jax\)"):
        train.train_and_evaluate(fine_tune, str(tmp_path / "third"))
    assert not (tmp_path / "third").exists()  # refused before anything was written


def test_a_run_starts_from_the_imagenet_weights_of_its_backbone(tmp_path, data_dir, hub, caplog):
    """config.model.pretrained="imagenet" (the paper configs' default): the weights that fit the
    backbone are fetched from the Hub before the dataset is built, and the run starts from them;
    a resumed run needs neither the weights nor the network."""
    config = tiny_config(data_dir, num_train_steps=1, learning_rate=0.0)
    config.model.pretrained = "imagenet"
    unbuilt = tiny_config(str(tmp_path / "unbuilt"), **{"model.pretrained": "imagenet"})
    with pytest.raises(convert.DownloadError, match=r"resnet18\.tv_in1k.*HTTP 404"):
        train.train_and_evaluate(unbuilt, str(tmp_path / "failed"))
    # Failed in seconds: before the dataset build, and before anything was written.
    assert not (tmp_path / "unbuilt").exists() and not (tmp_path / "failed").exists()

    hub.serve_like_the_hub(HUB_RESNET18, resnet18_safetensors())
    caplog.set_level("INFO")
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    cache = tmp_path / "cache"
    repo = HUB_RESNET18.split("/resolve")[0]
    imagenet, _ = convert.from_imagenet(cache / f"weights/huggingface{repo}/model.safetensors")
    assert_trees_equal(state.params["backbone"], imagenet["params"])  # learning rate 0
    assert any("hf-hub:timm/resnet18.tv_in1k" in r.getMessage() for r in caplog.records)

    shutil.rmtree(cache)
    downloads = hub.downloads()
    train.train_and_evaluate(config, str(tmp_path / "run"))  # resumes at its last step
    assert hub.downloads() == downloads and not cache.exists()


def test_pretrained_backbone_statistics_replace_the_initial_ones(tmp_path):
    # The run above checks params only (a step moves the BN statistics): a run whose pretrained
    # BatchNorm means and variances were dropped would evaluate with the initial 0 and 1.
    path = tmp_path / "resnet18.safetensors"
    path.write_bytes(resnet18_safetensors())
    model = models.create("fcn", num_classes=3, backbone="resnet18", stem="torchvision")
    state = train.state_from_variables(models.random_variables(model), optax.sgd(0.1))
    config = ml_collections.ConfigDict(
        {"model": {"pretrained": str(path), "pretrained_kind": "timm"}}
    )
    state = train._load_pretrained(state, model, config, None)
    imagenet, _ = convert.from_imagenet(path)
    assert_trees_equal(state.batch_stats["backbone"], imagenet["batch_stats"])
    assert_trees_equal(state.params["backbone"], imagenet["params"])


def test_periodic_eval_is_logged_and_kept_out_of_the_training_rate(tmp_path, data_dir, monkeypatch):
    from pan_jax import evaluate

    calls = []

    def evaluate_dataset(*args, **kwargs):
        calls.append(kwargs)
        return real_evaluate_dataset(*args, **kwargs)

    real_evaluate_dataset = evaluate.evaluate_dataset
    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, num_train_steps=4, eval_every_steps=2, checkpoint_every_steps=4)
    config.eval.update(mode="slide", crop_size=128, stride=96, scales=(0.5, 1.0), flip=True)
    train.train_and_evaluate(config, str(workdir))
    assert len(calls) == 2  # config.eval's inference mode, but single-scale and no flip
    assert {(c["mode"], c["crop_size"], c["stride"], c["scales"], c["flip"]) for c in calls} == {
        ("slide", (128, 128), (96, 96), (1.0,), False)
    }
    # A wrong config.eval fails before training, not after eval_every_steps of it.
    config.eval.mode = "tiles"
    config.checkpoint_every_steps = 1  # a late failure would leave checkpoints 1 and 2
    with pytest.raises(ValueError, match=r"config\.eval\.mode='tiles'"):
        train.train_and_evaluate(config, str(tmp_path / "bad_eval"))
    assert not list((tmp_path / "bad_eval" / "checkpoints").glob("[0-9]*"))
    config.eval.mode = "whole"
    config.data.eval_split = "validation"  # pan_synthetic has "val"
    with pytest.raises(ValueError, match=r"no split 'validation'.*eval_split"):
        train.train_and_evaluate(config, str(tmp_path / "bad_split"))
    assert not list((tmp_path / "bad_split" / "checkpoints").glob("[0-9]*"))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/miou" in r}
    assert sorted(evals) == [2, 4]
    assert all(0.0 <= r["eval/miou"] <= 1.0 for r in evals.values())
    rows = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    assert "train/images_per_second" not in rows[1]  # the compiling step has no rate
    for step in (2, 3, 4):  # an eval right after a logged step must not void its rate
        assert math.isfinite(rows[step]["train/images_per_second"]), rows[step]


def test_periodic_eval_scores_its_steps_state_and_logs_its_own_figures(
    tmp_path, data_dir, monkeypatch, caplog
):
    """Each eval scores the parameters of the step it is logged at (the checkpoint of that step,
    the state the run returns at the end), its mIoU and pixel accuracy are logged under their own
    names, and the time an eval takes is left out of the next step's img/s."""
    from pan_jax import evaluate, summary

    real_evaluate_dataset = evaluate.evaluate_dataset
    scored = []  # (variables, report) of each eval
    clock = types.SimpleNamespace(offset=0.0)
    real_time = train.time

    def evaluate_dataset(model, variables, *args, **kwargs):
        report = real_evaluate_dataset(model, variables, *args, **kwargs)
        scored.append((jax.device_get(variables), report))
        clock.offset += 1000.0  # an eval of 1,000 s: the host's clock, as train reads it
        return report

    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    monkeypatch.setattr(
        train,
        "time",
        types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + clock.offset),
    )
    workdir = tmp_path / "run"
    config = tiny_config(
        data_dir,
        num_train_steps=2,
        eval_every_steps=1,
        checkpoint_every_steps=1,
        # What is evaluated matters here, not the model: the quickest.
        **{"model.name": "fcn", "model.overrides": ml_collections.ConfigDict()},
    )
    config.data.eval_split = "val[:2]"  # two images: what is scored matters here, not how
    with caplog.at_level(std_logging.INFO):
        state = train.train_and_evaluate(config, str(workdir))
    assert caplog.text.count("eval done: 2/2 images") == 2  # out of how many: its progress

    records, _ = summary.read_records(epath.Path(workdir) / "metrics.jsonl")
    evals = [r for r in records if "eval/miou" in r]
    assert [r["step"] for r in evals] == [1, 2]
    at_step_1, _, _ = checkpointing.restore_for_inference(workdir, 1)
    for (variables, report), expected, record in zip(
        scored, (at_step_1, jax.device_get(state.variables)), evals, strict=True
    ):
        for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(got, want)
        assert record["eval/miou"] == pytest.approx(report["miou"])
        assert record["eval/pixel_accuracy"] == pytest.approx(report["pixel_accuracy"])
    assert scored[0][1]["miou"] != scored[0][1]["pixel_accuracy"]  # the names tell them apart
    rates = {r["step"]: r.get("train/images_per_second") for r in records if "train/loss" in r}
    assert rates[2] > 2 / 100, rates  # one step of 2 images, not the 1,000 s eval before it


def test_the_last_step_is_evaluated_off_the_period():
    # 1,000 steps evaluated every 300 never scored the model they ended with.
    config = tiny_config("unused", num_train_steps=5, eval_every_steps=2)
    assert [step for step in range(1, 6) if train._is_eval_step(step, config)] == [2, 4, 5]
    config.eval_every_steps = 0
    assert not any(train._is_eval_step(step, config) for step in range(1, 6))


def test_eta_counts_hours_past_a_day():
    assert train.format_duration(3 * 86400 + 61.4) == "72:01:01"
    assert train.format_duration(59.6) == "0:01:00"


def test_relative_workdirs_and_model_directories_as_in_the_readme(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # README: --workdir=runs/demo, --output=models/...
    state = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=1), "runs/demo")
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "1").is_dir()
    variables, spec, step = checkpointing.restore_for_inference("runs/demo")  # eval, predict
    assert step == 1
    assert_trees_equal(variables["params"], state.params)
    checkpointing.save_variables("models/run", variables, spec)  # python -m pan_jax.convert
    again, _ = checkpointing.load_variables("models/run")
    assert_trees_equal(again["params"], state.params)


def test_a_model_directory_is_refused_as_a_workdir_and_left_as_it_was(tmp_path, data_dir):
    config = tiny_config(data_dir)
    spec = train.model_spec(config)
    model_dir = tmp_path / "model"  # as python -m pan_jax.convert writes one
    variables = models.random_variables(train.create_model(config, spec))
    checkpointing.save_variables(model_dir, variables, spec)
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    # Refused before its dataset is built (minutes for VOC): this data_dir stays empty.
    code, output = run_main(model_dir, str(tmp_path / "fresh_data"), num_train_steps=1)
    assert not (tmp_path / "fresh_data").exists()
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert f"error: {model_dir} is a model directory" in output
    assert "--config.model.pretrained_kind=pan_jax" in output
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    assert not (model_dir / "checkpoints").exists()


def test_a_model_directory_takes_no_step_and_a_workdir_with_model_files_stays_a_workdir(tmp_path):
    # --step on a converted model would load its one set of weights as if it were that step's;
    # a workdir that also got variables/ (convert --output into it) must still resume and
    # evaluate its checkpoints.
    model_dir = tmp_path / "model"
    (model_dir / "variables").mkdir(parents=True)
    (model_dir / "model.json").write_text("{}")
    assert checkpointing.directory_kind(model_dir) == "model"
    with pytest.raises(ValueError, match=r"holds one set of weights .*: step=3 needs a workdir"):
        checkpointing.directory_kind(model_dir, 3)
    (model_dir / "checkpoints" / "3").mkdir(parents=True)
    assert checkpointing.directory_kind(model_dir, 3) == "workdir"
    checkpointing.refuse_model_directory(model_dir)  # its run may resume there


def test_a_workdir_this_user_cannot_write_is_refused_naming_the_flag(tmp_path, monkeypatch):
    # Learnt before the dataset is built, not at the first checkpoint. Root may write anywhere,
    # hence os.access stubbed: the nearest existing folder is the one judged.
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    workdir = tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match=rf"--workdir={workdir}: {tmp_path} is not writable"):
        checkpointing.check_writable_directory(workdir, "--workdir")
    monkeypatch.chdir(tmp_path)  # a bucket is no folder below the current one
    checkpointing.check_writable_directory("gs://bucket/runs/x", "--workdir")  # shows later


FCN_SPEC = {"name": "fcn", "backbone": "resnet18", "num_classes": 3, "overrides": {}}


def _fcn_state(optimizer=None):
    model = models.create("fcn", num_classes=3, backbone="resnet18")
    return train.state_from_variables(models.random_variables(model), optimizer or optax.sgd(0.1))


def _checkpoint_manager(workdir):
    saving = ml_collections.ConfigDict({"keep_checkpoints": 3, "checkpoint_every_steps": 1})
    return checkpointing.create_manager(workdir, saving)


def test_a_resume_restores_the_latest_of_the_kept_checkpoints(tmp_path):
    # A run is deterministic in its step: resumed from an older checkpoint it would end the
    # same, only after redoing the steps since, so the resume tests cannot tell.
    state = _fcn_state()
    placement = sharding.replicated(sharding.create_mesh())
    manager = _checkpoint_manager(tmp_path / "run")
    assert checkpointing.restore_or_none(manager, state, placement) is None  # a new run
    for step in (2, 4):
        checkpointing.save(manager, step, state.replace(step=jnp.int32(step)), FCN_SPEC, force=True)
    manager.wait_until_finished()
    restored = checkpointing.restore_or_none(manager, state, placement)
    manager.close()
    assert int(restored.step) == 4


def test_a_checkpoint_lacking_the_models_arrays_is_a_mismatch_not_a_crash_later(tmp_path):
    # Inference restores only params and batch statistics (a partial restore): arrays the
    # checkpoint lacked came back as placeholders and failed at the first apply, far from here.
    manager = _checkpoint_manager(tmp_path / "run")
    # A meta and a state that disagree (a layer renamed between versions reads the same way).
    checkpointing.save(manager, 2, _fcn_state(), {**FCN_SPEC, "backbone": "resnet34"}, force=True)
    manager.wait_until_finished()
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"does not fit its model.json's model: it lacks 80 of the model's arrays, e\.g\. "
        r"\['batch_stats'\]\['backbone'\]\['layer1_2'\]",
    ):
        checkpointing.restore_for_inference(tmp_path / "run")
    # Training restores the whole state: another structure (here momentum) is a mismatch too.
    momentum = _fcn_state(optax.sgd(0.1, momentum=0.9))
    with pytest.raises(
        checkpointing.CheckpointMismatchError, match="does not fit this run's state"
    ):
        checkpointing.restore_or_none(
            manager, momentum, sharding.replicated(sharding.create_mesh())
        )
    manager.close()


def test_a_damaged_checkpoint_is_named_with_the_step_to_resume_from(tmp_path, data_dir):
    """A cut data file or a missing meta: one error naming the step and the way back to the
    one before; nothing deleted, and the run's record (config.json) left as it was."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(data_dir), str(workdir))  # checkpoints 2 and 4
    checkpoints = workdir / "checkpoints"
    record = (workdir / "config.json").read_bytes()
    for path in (checkpoints / "4" / "state").rglob("*"):  # the arrays' data files: which
        if path.is_file() and path.stat().st_size > 1_000_000:  # holds the parameters varies
            with open(path, "r+b") as f:
                f.truncate(1000)  # as a copy cut short, or a disk that filled, leaves it
    message = r"checkpoint 4 in .* is incomplete or damaged \(.*\)\. Move it aside .*from step 2"
    # In processes of their own: orbax abandons the reads of a failed restore, which complain
    # as they end (checkpointing quiets them; pytest puts its own unraisablehook in front in
    # each test, and would report them in a later one).
    for mode in ("train", "eval"):  # resume; --mode=eval (predict loads the same way)
        code, output = run_main(workdir, data_dir, f"--mode={mode}", num_train_steps=6)
        assert code == 1 and "Traceback" not in output, output[-3000:]
        assert re.search("error: " + message, output), output[-3000:]
        assert (workdir / "config.json").read_bytes() == record
    shutil.rmtree(checkpoints / "4" / "meta")  # an item missing
    resumed = tiny_config(data_dir, num_train_steps=6)
    with pytest.raises(checkpointing.CheckpointDamagedError, match=message):
        train.train_and_evaluate(resumed, str(workdir))
    with pytest.raises(checkpointing.CheckpointDamagedError, match=message):
        checkpointing.restore_for_inference(workdir)
    assert (workdir / "config.json").read_bytes() == record
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2", "4"]
    # With more kept, the newest before the damaged one (naming the oldest went unseen).
    manager = types.SimpleNamespace(directory=epath.Path("/w"), all_steps=lambda: [2, 4, 6])
    error = checkpointing._damaged(manager, 6, OSError("cut"))
    assert "OSError: cut" in str(error) and str(error).endswith("to resume from step 4.")


def test_the_workdir_lock_is_dropped_on_leaving_and_taken_by_process_zero_only(
    tmp_path, monkeypatch
):
    # Were the lock file not closed on leaving the block, only the garbage collector would drop
    # the lock, and a run retried in the same process (a notebook keeping the failed run's
    # traceback) would be refused as "in use" by itself. Were every process to lock a shared
    # workdir, all but process 0 of a multi-process run would be refused.
    with checkpointing.WorkdirLock(tmp_path) as lock:
        lock.acquire()
        with pytest.raises(checkpointing.WorkdirInUseError, match=f"process {os.getpid()} "):
            checkpointing.WorkdirLock(tmp_path).acquire()
    again = checkpointing.WorkdirLock(tmp_path)  # `lock` is still referenced
    again.acquire()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = checkpointing.WorkdirLock(tmp_path)
    other.acquire()  # process 1 leaves the lock to process 0
    assert other._file is None
    again.release()


def test_the_lock_file_names_only_its_current_holder(tmp_path):
    # A lock file left by an earlier run must not make the refusal name that run too.
    (tmp_path / "run.lock").write_text("process 1 on host a-long-gone-machine-name\n" * 3)
    with checkpointing.WorkdirLock(tmp_path) as lock:
        lock.acquire()
        holder = f"process {os.getpid()} on host {socket.gethostname()}\n"
        assert (tmp_path / "run.lock").read_text() == holder


def test_a_workdir_that_cannot_be_locked_is_used_with_a_warning(tmp_path, monkeypatch, caplog):
    # A file system without flock (Lustre without -o flock), or an object store: the run goes
    # on, and says that nothing stops a second one.
    import fcntl

    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(std_logging.WARNING):
        lock = checkpointing.WorkdirLock(tmp_path)
        lock.acquire()
    assert lock._file is None
    assert "cannot be locked" in caplog.text and "nothing stops a second run" in caplog.text
    bucket = checkpointing.WorkdirLock("gs://bucket/run")
    bucket.acquire()  # nothing made or opened (a local gs:/bucket folder, or an error)
    assert bucket._file is None and not Path("gs:").exists()


@pytest.mark.parametrize(
    "pathname, level, shown",
    [
        ("/site-packages/orbax/checkpoint/manager.py", std_logging.INFO, False),
        ("/site-packages/grain/_src/loader.py", std_logging.INFO, False),
        ("/site-packages/jax/_src/compiler.py", std_logging.INFO, False),
        ("/site-packages/orbax/checkpoint/manager.py", std_logging.WARNING, True),
        ("/site-packages/jax/_src/compiler.py", std_logging.ERROR, True),
        ("/work/pan_jax/train.py", std_logging.INFO, True),
    ],
)
def test_the_tools_log_drops_only_the_libraries_info_lines(pathname, level, shown):
    # Nothing checked the filter: a library's warning (orbax: a checkpoint not saved) dropped
    # with its INFO chatter went unseen.
    from pan_jax import logs

    record = std_logging.LogRecord("absl", level, pathname, 1, "message", None, None)
    assert logs._QuietLibraries().filter(record) == shown


def test_only_the_abandoned_reads_of_orbax_are_quieted(monkeypatch, caplog):
    """Each restore first quiets what a failed one leaves behind (test above): TensorStore's
    callbacks into orbax's closed loop and orbax's reads that failed unawaited. The same errors
    from anywhere else are still shown: the hooks stay in the user's process."""
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    monkeypatch.setattr(std_logging.getLogger("asyncio"), "filters", [])
    checkpointing._quiet_abandoned_reads()
    hook = sys.unraisablehook
    checkpointing._quiet_abandoned_reads()  # every restore: no hook stacked on hook
    assert sys.unraisablehook is hook and len(std_logging.getLogger("asyncio").filters) == 1

    closed_loop = asyncio.new_event_loop()
    closed_loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as raised:
        closed_loop.call_soon_threadsafe(print)
    for where, shown in ((raised.tb.tb_next, False), (raised.tb, True)):  # from C; from Python
        sys.unraisablehook(
            types.SimpleNamespace(
                exc_type=RuntimeError,
                exc_value=raised.value,
                exc_traceback=where,
                err_msg=None,
                object=None,
            )
        )
        assert len(passed_on) == shown
    orbax_code = compile("raise OSError('cut short')", f"{os.sep}orbax{os.sep}read.py", "exec")

    async def orbax_read():
        exec(orbax_code)

    async def elsewhere():
        raise OSError("not orbax")

    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(orbax_read()), loop.create_task(elsewhere())]
    loop.run_until_complete(asyncio.sleep(0))  # both fail, and nobody asks
    loop.close()
    del tasks
    gc.collect()
    unretrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert [str(r.exc_info[1]) for r in unretrieved] == ["not orbax"]
    try:  # another of asyncio's reports of a failure in orbax's code: shown
        exec(orbax_code)
    except OSError:
        failure = sys.exc_info()
    message = "Exception in callback orbax_read()"
    record = std_logging.LogRecord("asyncio", std_logging.ERROR, "", 0, message, None, failure)
    assert std_logging.getLogger("asyncio").filter(record)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, r"config\.batch_size=0 .* at least 1"),
        ("data.min_scale", 2.5, r"config\.data\.min_scale=2\.5 and .*max_scale=2\.0"),
        ("model.dtype", "bf16", r"config\.model\.dtype='bf16': expected 'float32' or 'bfloat16'"),
        ("model.dtype", "float16", r"config\.model\.dtype='float16': expected"),
        ("keep_checkpoints", 0, r"config\.keep_checkpoints=0: expected at least 1"),
        ("checkpoint_every_steps", 0, r"config\.checkpoint_every_steps=0: expected at least 1"),
        ("log_every_steps", 0, r"config\.log_every_steps=0: expected at least 1"),
        ("num_train_steps", -1, r"config\.num_train_steps=-1 and .*at least 0"),
        # failed at the first step, after the dataset, the workdir and the compile
        ("data.crop_size", 64, r"config\.data\.crop_size=64: .* at least 128 px"),
    ],
)
def test_bad_fields_are_named_before_the_workdir_is_touched(
    tmp_path, data_dir, field, value, message
):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_config(data_dir, **{field: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_bad_model_option_value_fails_before_the_workdir_is_touched(tmp_path, data_dir):
    config = tiny_config(data_dir)
    config.model.overrides.output_stride = 4  # checked by the backbone, as the model is traced
    with pytest.raises(ValueError, match="output_stride"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_checkpointed_but_unevaluated_step_is_evaluated_on_resume(
    tmp_path, data_dir, monkeypatch
):
    # A run stopped between its save and its eval (preempted, killed during the final eval)
    # resumed to "training finished" with no evaluation of that step, ever.
    from pan_jax import evaluate

    calls = []
    real_evaluate_dataset = evaluate.evaluate_dataset

    def evaluate_dataset(*args, **kwargs):
        calls.append(1)
        return real_evaluate_dataset(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(workdir))
    config = tiny_config(data_dir, num_train_steps=2, eval_every_steps=2)
    train.train_and_evaluate(config, str(workdir))
    assert len(calls) == 1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/miou" in r] == [2]
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "train/lo')  # a line cut short by a kill
    train.train_and_evaluate(config, str(workdir))  # evaluated now: nothing more to do
    assert len(calls) == 1

    # The optimizer's layout is checked like the model, naming the field.
    config.num_train_steps, config.decoder_lr_multiplier = 4, 10.0
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"config\.decoder_lr_multiplier=1, this config has config\.decoder_lr_multiplier!=1",
    ):
        train.train_and_evaluate(config, str(workdir))


def test_a_sigterm_during_an_eval_exits_before_another_step(
    tmp_path, data_dir, monkeypatch, caplog
):
    """The grace period of a preemption is short: a signal that came during an evaluation (a
    periodic one, or the one a resumed run owes) ends the run at that step, saved."""
    from pan_jax import evaluate

    def evaluate_dataset(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the cluster preempts the run as it evaluates
        return {"miou": 0.5, "pixel_accuracy": 0.5, "num_images": 1}

    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    caplog.set_level("INFO")
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, num_train_steps=8, eval_every_steps=2, checkpoint_every_steps=8)
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 2 and checkpointing.finished_steps(workdir) == [2]
    assert "SIGTERM: checkpoint at step 2 written, exiting" in caplog.text
    metrics = workdir / "metrics.jsonl"  # the eval of step 2 unrecorded: the resume owes it
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))
    caplog.clear()
    state = train.train_and_evaluate(config, str(workdir))
    assert "evaluating it" in caplog.text
    assert int(state.step) == 2 and checkpointing.finished_steps(workdir) == [2]
    assert "SIGTERM: checkpoint at step 2 written, exiting" in caplog.text


def test_a_stop_during_the_last_step_leaves_its_evaluation_to_the_resume(
    tmp_path, data_dir, monkeypatch, caplog
):
    # It logged "training finished" (launch/tpu_pod.sh then deletes the slice) with the final
    # evaluation skipped, owed to a resume that would never come.
    real_global_batch = sharding.global_batch
    batches = []

    def global_batch(*args, **kwargs):
        batches.append(1)
        if len(batches) == 4:  # the last step's: the notice comes while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real_global_batch(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", global_batch)
    caplog.set_level("INFO")
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=8)
    train.train_and_evaluate(config, str(workdir))
    assert "SIGTERM: checkpoint at step 4 written, exiting" in caplog.text
    assert checkpointing.finished_steps(workdir) == [4]
    assert "training finished" not in caplog.text and "eval at step" not in caplog.text
    caplog.clear()
    train.train_and_evaluate(config, str(workdir))
    assert "evaluating it" in caplog.text and "eval at step 4" in caplog.text
    assert "training finished at step 4" in caplog.text
    # Without evaluations the run is done at its last step, stopped or not.
    batches.clear()
    caplog.clear()
    config = tiny_config(data_dir, num_train_steps=4, checkpoint_every_steps=8)
    train.train_and_evaluate(config, str(tmp_path / "no_eval"))
    assert "training finished at step 4" in caplog.text


def test_training_finished_is_logged_once_the_last_checkpoint_is_written(
    tmp_path, data_dir, monkeypatch, caplog
):
    # The final save was waited for only after the SIGTERM handler was gone: a SIGTERM after
    # "training finished" (which tpu_pod.sh takes for the end) killed its write.
    import orbax.checkpoint as ocp

    events = []
    real_wait = ocp.CheckpointManager.wait_until_finished

    def wait_until_finished(self):
        real_wait(self)
        events.append(("written", tuple(checkpointing.finished_steps(tmp_path / "run"))))

    class Handler(std_logging.Handler):
        def emit(self, record):
            if "training finished" in record.getMessage():
                events.append(("finished", None))
                handler_installed.append(signal.getsignal(signal.SIGTERM))

    handler_installed = []
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_until_finished)
    handler = Handler()
    caplog.set_level("INFO")
    std_logging.getLogger().addHandler(handler)
    try:
        config = tiny_config(data_dir, num_train_steps=3, checkpoint_every_steps=2)
        train.train_and_evaluate(config, str(tmp_path / "run"))
    finally:
        std_logging.getLogger().removeHandler(handler)
    finished = events.index(("finished", None))
    assert ("written", (2, 3)) in events[:finished], events
    assert handler_installed[0] not in (signal.SIG_DFL, signal.default_int_handler)


def test_an_option_spelled_out_at_its_default_is_the_same_model():
    # Resuming with --config.model.overrides.output_stride=16 (pan_smp's own) was refused.
    plain = {"name": "pan_smp", "backbone": "resnet18", "num_classes": 3, "overrides": {}}
    spelled = {
        **plain,
        "overrides": {"output_stride": 16, "fpa_kernels": [7, 5, 3], "avg_down": False},
    }
    checkpointing.check_spec(plain, spelled, "test")
    checkpointing.check_spec(spelled, plain, "test")
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"overrides\.output_stride: checkpoint None, config 8",
    ):
        checkpointing.check_spec(plain, {**plain, "overrides": {"output_stride": 8}}, "test")
    with pytest.raises(  # a default spelled out shows as itself
        checkpointing.CheckpointMismatchError,
        match=r"overrides\.output_stride: checkpoint 32, config 16",
    ):
        checkpointing.check_spec({**plain, "overrides": {"output_stride": 32}}, spelled, "test")


def test_a_spec_read_from_json_makes_a_model_jit_can_take_as_static():
    # JSON turns tuple options into lists; a model holding one cannot be hashed, and inference
    # passes the model to jit as a static argument.
    spec = {"name": "pan_smp", "backbone": "resnet18", "num_classes": 3}
    spec["overrides"] = {"fpa_kernels": (5, 3, 3)}  # not its default (7, 5, 3)
    hash(checkpointing.model_from_spec(json.loads(json.dumps(spec))))


def test_a_compute_dtype_in_a_saved_spec_is_the_same_model():
    # Specs of runs from before train.model_spec refused overrides.dtype may hold it; it changes
    # no parameter, so resuming or evaluating them with today's config is no mismatch.
    now = {"name": "pan_smp", "backbone": "resnet18", "num_classes": 3, "overrides": {}}
    old = {**now, "overrides": {"dtype": "bfloat16"}}
    checkpointing.check_spec(old, now, "test")
    checkpointing.check_spec(now, old, "test")


def test_a_saved_option_the_model_never_took_loads_and_resumes():
    # Before models.create refused it, `--config.model.name=fcn` on the demo config saved
    # decoder_channels=64 in fcn's spec: the model loads, and resuming without it is no mismatch.
    old = {"name": "fcn", "backbone": "resnet18", "num_classes": 3}
    old["overrides"] = {"decoder_channels": 64, "stem": "torchvision"}
    model = checkpointing.model_from_spec(old)
    assert model.decoder is None and model.backbone.stem == "torchvision"
    now = {**old, "overrides": {"stem": "torchvision"}}
    checkpointing.check_spec(old, now, "test")
    checkpointing.check_spec(now, old, "test")
    with pytest.raises(  # another dataset's classes: named, not a shape error deep in orbax
        checkpointing.CheckpointMismatchError, match=r"num_classes: checkpoint 3, config 19"
    ):
        checkpointing.check_spec(old, {**now, "num_classes": 19}, "test")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['decoder_width'\]"):
        checkpointing.model_from_spec({**old, "overrides": {"decoder_width": 64}})


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), workdir)
    with pytest.raises(train.NonFiniteLossError, match=r"step 3.*last good checkpoint \(step 2\)"):
        train.train_and_evaluate(
            tiny_config(data_dir, num_train_steps=6, learning_rate=1e38, checkpoint_every_steps=1),
            workdir,
        )
    _, _, step = checkpointing.restore_for_inference(workdir)
    assert step == 2

    other = tiny_config(data_dir, num_train_steps=4)
    other.model.overrides.decoder_channels = 24
    record = {name: (Path(workdir) / name).read_text() for name in ("config.json", "model.json")}
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"overrides\.decoder_channels: checkpoint 16, config 24",
    ):
        train.train_and_evaluate(other, workdir)
    other.model.overrides.decoder_channels = 16
    other.model.overrides.unknown_switch = 1
    with pytest.raises(ValueError, match="unknown_switch"):
        train.train_and_evaluate(other, workdir)
    del other.model.overrides["unknown_switch"]
    other.data.data_dir = str(tmp_path / "a_file")  # data that cannot be prepared
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"data\.data_dir=.*a_file is a file"):
        train.train_and_evaluate(other, workdir)
    # No refused run replaced the record of the run that owns the workdir.
    assert record == {name: (Path(workdir) / name).read_text() for name in record}


def train_step_compiles(config, workdir, caplog) -> tuple[list[str], list[str]]:
    """(train_step compilations, every log message) of a run, in every thread."""
    jax.config.update("jax_log_compiles", True)  # for every thread (the context is per thread)
    try:
        with caplog.at_level(std_logging.INFO):
            train.train_and_evaluate(config, workdir)
    finally:
        jax.config.update("jax_log_compiles", False)
    messages = [r.getMessage() for r in caplog.records]
    return [m[:200] for m in messages if "compilation of jit(train_step)" in m], messages


def test_the_train_step_compiles_once_ahead_while_the_run_starts(
    data_dir, tmp_path, caplog, monkeypatch
):
    """The step compiles in a thread during init and the input pipeline's start; its first call
    must reuse that executable (the batch spec matches what the pipeline yields), not compile
    it a second time."""
    started, compiled = [], []

    class Recorded(compile_ahead.CompileAhead):
        def _compile(self, step_fn, args):
            started.append(args)
            compiled.append(super()._compile(step_fn, args))
            return compiled[-1]

    monkeypatch.setattr(compile_ahead, "CompileAhead", Recorded)
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir, num_train_steps=2, grad_accum_steps=2)
    compiles, messages = train_step_compiles(config, workdir, caplog)
    assert len(started) == 1
    # The thread compiled it (a thread that skipped it left the loop's call to compile it once).
    assert compiled == [True]
    assert len(compiles) == 1, compiles
    # Time to the first step, start-up included, as a user waits for it.
    pattern = r"first step done [\d.]+ s after train_and_evaluate started"
    assert any(re.fullmatch(pattern, m) for m in messages)
    train.train_and_evaluate(config, workdir)  # finished: nothing to compile ahead
    assert len(started) == 1


def test_a_caller_s_jax_context_is_not_compiled_ahead_in_vain(data_dir, tmp_path, caplog):
    # The thread does not inherit a caller's thread-local settings: its step would differ from
    # the one the loop calls, and compile twice.
    with jax.default_matmul_precision("bfloat16"):  # conftest sets "highest" for all
        compiles, messages = train_step_compiles(
            tiny_config(data_dir, num_train_steps=1), str(tmp_path / "run"), caplog
        )
    assert len(compiles) == 1, compiles
    assert "train step not compiled ahead: the caller's JAX settings differ" in messages


def test_an_error_during_start_up_is_logged_before_the_compile_ends(
    data_dir, tmp_path, caplog, monkeypatch
):
    def broken(*args, **kwargs):
        raise ValueError("no state today")

    monkeypatch.setattr(train, "create_state", broken)
    with caplog.at_level(std_logging.INFO), pytest.raises(ValueError, match="no state today"):
        train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "run"))
    messages = [r.getMessage() for r in caplog.records]
    assert "ValueError: no state today" in messages
    waiting = [i for i, m in enumerate(messages) if m.startswith("waiting for XLA's compilation")]
    assert waiting and waiting[0] > messages.index("ValueError: no state today")
    # The error leaves no compile running (Python's exit would wait for it).
    assert not any(t.name.startswith("compile_ahead") for t in threading.enumerate())


def test_a_compile_ahead_that_fails_is_a_warning_and_the_run_goes_on(caplog):
    # The first step compiles the step again and raises what is wrong with it, if anything.
    def lower(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")

    step_fn = types.SimpleNamespace(lower=lower)
    with caplog.at_level(std_logging.WARNING), compile_ahead.CompileAhead(step_fn):
        pass
    assert "compiling the train step ahead failed: RuntimeError: RESOURCE_EXHAUSTED" in caplog.text


def test_ctrl_c_while_the_compile_is_awaited_exits_at_once():
    script = textwrap.dedent(
        """
        import os, signal, threading, time, types
        from pan_jax import compile_ahead

        def slow_compile():
            time.sleep(60)

        step_fn = types.SimpleNamespace(
            lower=lambda *args: types.SimpleNamespace(compile=slow_compile)
        )
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # the second Ctrl-C
        with compile_ahead.CompileAhead(step_fn):
            raise KeyboardInterrupt  # the first one, during start-up
        """
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 130, result.stderr[-2000:]
    assert time.perf_counter() - start < 30  # not the compile's 60 s
    assert "waiting for XLA's compilation" in result.stderr
    assert "terminate called" not in result.stderr


def test_resuming_with_another_config_says_what_changed(tmp_path, caplog):
    # It was silent: a resumed run with another batch size, or a longer schedule (which changes
    # every remaining learning rate), overwrote config.json without a word.
    spec = FCN_SPEC
    config = tiny_config(str(tmp_path / "tfds"))
    workdir = epath.Path(tmp_path)
    with caplog.at_level(std_logging.WARNING):
        checkpointing.write_run_record(workdir, config, spec)
        checkpointing.write_run_record(workdir, config, spec)
    assert "differs from its config.json" not in caplog.text
    config.batch_size, config.num_train_steps = 4, config.num_train_steps + 10
    config.model.overrides.output_stride = 8
    with caplog.at_level(std_logging.WARNING):
        checkpointing.write_run_record(workdir, config, spec)
    assert f"resuming {workdir} with a config that differs from its config.json: " in caplog.text
    assert "batch_size 2 -> 4" in caplog.text
    assert "model.overrides.output_stride None -> 8" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 4
    (workdir / "config.json").write_text('{"seed": 0, "model": {')  # cut by a crash
    with caplog.at_level(std_logging.WARNING):
        checkpointing.write_run_record(workdir, config, spec)  # was a ValueError
    assert "config.json: not valid JSON" in caplog.text and "replacing it" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 4


def test_a_resume_that_fails_before_its_first_step_leaves_the_record(tmp_path, data_dir):
    # config.json was rewritten before the input pipeline opened: a resume refused for its
    # split (or its first batch, or its compile) left a record of a run that never ran.
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(workdir))
    record = {name: (workdir / name).read_bytes() for name in ("config.json", "model.json")}
    resumed = tiny_config(data_dir, num_train_steps=4, batch_size=4)
    resumed.data.train_split = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        train.train_and_evaluate(resumed, str(workdir))
    assert {name: (workdir / name).read_bytes() for name in record} == record
    resumed.data.train_split = tiny_config(data_dir).data.train_split
    train.train_and_evaluate(resumed, str(workdir))  # its first step ran: its record now
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 4


def test_a_damaged_metrics_file_does_not_stop_a_resume(tmp_path):
    # Bytes that are no UTF-8, a line without a step, one that is no object: a resume failed
    # on them (UnicodeDecodeError, KeyError, TypeError) before its first step.
    from pan_jax import summary

    metrics = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "train/loss": 2.0}, {"step": 2, "eval/miou": 0.5}]
    lines = [json.dumps(good[0]).encode(), b"\xff\xfe{", b"{}", b"[1, 2]", b'{"step": "2"}']
    metrics.write_bytes(b"\n".join([*lines, json.dumps(good[1]).encode(), b'{"step": 3, "tr']))
    assert summary.read_records(epath.Path(metrics)) == (good, 5)
    assert train._evaluated_steps(epath.Path(metrics)) == {2}
    summary.MetricWriter(tmp_path, start_step=2).close()  # keeps the records up to step 2
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == good


def test_tensorboard_gets_the_scalars_and_a_resume_forgets_the_steps_after_its_checkpoint(
    tmp_path,
):
    # Nothing read the event files back: scalars that never reached TensorBoard, or a restart
    # marked at the resumed step itself (which drops that step's own values), went unseen.
    from tensorboard.backend.event_processing import event_accumulator

    from pan_jax import summary

    writer = summary.MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"train/loss": float(step)})
    writer.close()
    # As a resumed run's, its file is named a later second (names hold the second, then a
    # per-process counter that sorts 10 before 9).
    time.sleep(1.1)
    resumed = summary.MetricWriter(tmp_path, start_step=2)  # killed after logging step 3
    resumed.write_scalars(3, {"train/loss": 30.0})
    resumed.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_second_run_in_a_live_runs_workdir_is_refused_and_changes_nothing(tmp_path, data_dir):
    # Two runs in one workdir (a command started twice, a job queued twice) wrote their
    # checkpoints among each other's.
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, num_train_steps=2, **{"model.overrides.pyramid_features": 1})
    train.train_and_evaluate(config, str(workdir))
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "run.lock"}
    holder = subprocess.Popen(  # a live run holds the lock from its start to its end
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pan_jax import checkpointing\n"
            "lock = checkpointing.WorkdirLock(sys.argv[1])\nlock.acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        code, output = run_main(workdir, data_dir, num_train_steps=4, checkpoint_every_steps=2)
        assert code == 1, output[-3000:]
        assert output.strip().splitlines()[-1] == (
            f"error: {workdir} is in use by another training run (process {holder.pid} on host "
            f"{socket.gethostname()}, per {workdir / 'run.lock'}): wait for it to end, or train "
            "in another --workdir"
        )
        after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
        assert {p: after[p] for p in files} == files, "the refused run wrote into the workdir"
        # Refused before it reads the live run's checkpoints (which may change as it reads).
        other_model = tiny_config(data_dir, **{"model.overrides.pyramid_features": 16})
        with pytest.raises(checkpointing.WorkdirInUseError):
            train.train_and_evaluate(other_model, str(workdir))
    finally:
        holder.kill()  # however a run ends, the kernel drops its lock
        holder.wait()
    config.num_train_steps = 4
    train.train_and_evaluate(config, str(workdir))
    assert checkpointing.finished_steps(workdir) == [2, 4]
    assert (workdir / "run.lock").read_text() == (
        f"process {os.getpid()} on host {socket.gethostname()}\n"
    )
