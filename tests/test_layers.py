"""Resize, adaptive pooling, BatchNorm, convolutions and the residual ReLU equal PyTorch's."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pan_jax.models import layers
from pan_jax.models.layers import (
    BatchNorm,
    Conv,
    adaptive_avg_pool,
    residual_relu,
    resize_bilinear,
)
from pan_jax.models.resnet import ResNet


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def from_torch(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((5, 7), (10, 14)),
        ((24, 32), (6, 8)),
        ((13, 9), (47, 5)),
        ((1, 1), (4, 6)),
        ((3, 3), (1, 1)),
    ],
)
def test_resize_matches_torch_interpolate(align_corners, in_size, out_size):
    x = np.random.default_rng(0).standard_normal((2, *in_size, 3)).astype(np.float32)
    ours = resize_bilinear(jnp.asarray(x), out_size, align_corners)
    reference = F.interpolate(
        to_torch(x), size=out_size, mode="bilinear", align_corners=align_corners
    )
    np.testing.assert_allclose(np.asarray(ours), from_torch(reference), atol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
def test_resize_in_bfloat16_rounds_once_as_torchs_bfloat16_interpolate(align_corners):
    """Torch interpolates bf16 with float32 weights and sums, rounding the result once."""
    x = np.random.default_rng(4).standard_normal((2, 32, 24, 8)) + 3
    x = jnp.asarray(x, jnp.bfloat16)
    ours = resize_bilinear(x, (64, 47), align_corners)
    assert ours.dtype == jnp.bfloat16
    ours = np.asarray(ours, np.float32)
    source = to_torch(np.asarray(x, np.float32))
    reference = from_torch(
        F.interpolate(
            source.bfloat16(), size=(64, 47), mode="bilinear", align_corners=align_corners
        ).float()
    )
    exact = from_torch(
        F.interpolate(source, size=(64, 47), mode="bilinear", align_corners=align_corners)
    )
    # Equal but where float32 weights or sums a bit apart round to neighbouring bf16 values.
    assert np.mean(ours != reference) < 1e-2
    np.testing.assert_allclose(ours, reference, rtol=2**-7)
    assert np.mean(np.abs(ours - exact)) <= 1.01 * np.mean(np.abs(reference - exact))


@pytest.mark.parametrize(
    "in_size, bins",
    [((13, 17), 6), ((6, 6), 3), ((7, 5), 2), ((9, 11), 1), ((1, 1), 6), ((2, 3), 6)],
)
def test_adaptive_avg_pool_matches_torch(in_size, bins):
    x = np.random.default_rng(1).standard_normal((2, *in_size, 4)).astype(np.float32)
    reference = F.adaptive_avg_pool2d(to_torch(x), bins)
    np.testing.assert_allclose(
        np.asarray(adaptive_avg_pool(jnp.asarray(x), bins)), from_torch(reference), atol=1e-6
    )


def test_adaptive_avg_pool_in_bfloat16_equals_torchs_bfloat16_pool():
    """Torch accumulates a bf16 pool in float32 and divides once; weights of 1/n rounded to
    bf16 would shift every window's mean by the same fraction (up to 0.4%)."""
    ones = jnp.ones((1, 600, 600, 2), jnp.bfloat16)
    assert np.all(np.asarray(adaptive_avg_pool(ones, 2), np.float32) == 1.0)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 150, 90, 4)) + 3, jnp.bfloat16)
    reference = F.adaptive_avg_pool2d(to_torch(np.asarray(x, np.float32)).bfloat16(), 6)
    ours = adaptive_avg_pool(x, 6)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), from_torch(reference.float()))


def test_batchnorm_train_step_matches_torch():
    x = np.random.default_rng(2).standard_normal((4, 5, 6, 3)).astype(np.float32) * 2 + 1
    torch_bn = torch.nn.BatchNorm2d(3).train()
    reference = torch_bn(to_torch(x))
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
    ours, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(ours), from_torch(reference.detach()), atol=1e-5)
    # Running statistics follow torch: momentum 0.1 and the *unbiased* variance.
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], torch_bn.running_mean.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], torch_bn.running_var.numpy(), atol=1e-6
    )


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("shape", [(16, 1, 1, 8), (2, 6, 5, 8), (2, 64, 48, 4)])
def test_batchnorm_statistics_hold_when_the_mean_dwarfs_the_spread(shape, one_pass, monkeypatch):
    """|mean| = 10⁴·std, as on FPA/GAU's pooled maps: E[x²] − E[x]² in float32 would lose every
    digit of the variance. Ours (float32) and its gradient equal torch's BatchNorm in float64,
    in one pass (the default) and in the two the benchmark compares it with."""
    monkeypatch.setattr(layers, "BATCHNORM_ONE_PASS", one_pass)
    rng = np.random.default_rng(5)
    x = (100.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    cotangent = rng.standard_normal(shape).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(shape[-1]).double().train()
    tx = to_torch(x).double().requires_grad_()
    reference = torch_bn(tx)
    (reference * to_torch(cotangent).double()).sum().backward()

    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.asarray(x), train=False)

    def loss(inputs):
        y, updates = bn.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    grad_x, (ours, stats) = jax.grad(loss, has_aux=True)(jnp.asarray(x))
    # float32 holds x to 100·2⁻²⁴ ≈ 6e-6 = 6e-4 std: the normalised values agree to that.
    np.testing.assert_allclose(ours, from_torch(reference.detach()), atol=3e-3)
    np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=1e-3)
    np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-6)
    scale = np.abs(from_torch(tx.grad)).max()
    np.testing.assert_allclose(grad_x / scale, from_torch(tx.grad) / scale, atol=3e-3)


SYNC_BN_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from pan_jax.models.layers import BatchNorm

    x = jnp.asarray(3 + np.random.default_rng(0).standard_normal((8, 6, 5, 3)), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    variables = BatchNorm().init(jax.random.key(0), x, train=False)

    def loss(bn, inputs, cotangent):
        y, updates = bn.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return jnp.sum(y * cotangent), updates["batch_stats"]

    def local(inputs, cotangent):  # one device's quarter of the batch, statistics over all
        grad, stats = jax.grad(loss, argnums=1, has_aux=True)(
            BatchNorm(axis_name="batch"), inputs, cotangent
        )
        return grad, stats

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P("batch")),
                                    out_specs=(P("batch"), P())))
    grad, stats = sharded(x, cotangent)
    full_grad, full_stats = jax.grad(loss, argnums=1, has_aux=True)(BatchNorm(), x, cotangent)
    print("RESULT", float(jnp.max(jnp.abs(grad - full_grad))),
          max(float(jnp.max(jnp.abs(stats[k] - full_stats[k]))) for k in ("mean", "var")))
    """
)


def test_batchnorm_with_axis_name_inside_shard_map_is_sync_batchnorm():
    """`BatchNorm(axis_name=...)` in shard_map: the statistics, the running averages (unbiased
    over the global count) and the input gradient equal one BatchNorm over the whole batch."""
    result = subprocess.run(
        [sys.executable, "-c", SYNC_BN_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    grad_error, stats_error = map(float, line.split()[1:])
    assert grad_error < 1e-5 and stats_error < 1e-5, (grad_error, stats_error)


def test_batchnorm_bf16_keeps_float32_statistics():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 8)), jnp.bfloat16)
    bn = BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((variables, updates)))
    assert isinstance(bn, nn.Module)


@pytest.mark.parametrize(
    "kernel, stride, dilation, use_bias",
    [(1, 1, 1, False), (1, 2, 1, True), (3, 1, 2, False), (3, 2, 1, True)],
)
def test_conv_matches_torch_conv2d_with_gradients(kernel, stride, dilation, use_bias):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 7, 5)).astype(np.float32)  # odd sizes: stride 2 floors
    pad = dilation * (kernel // 2)
    conv = Conv(6, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                kernel_dilation=dilation, use_bias=use_bias)  # fmt: skip
    variables = conv.init(jax.random.key(0), jnp.asarray(x))
    kernel_hwio = np.array(variables["params"]["kernel"])
    bias = np.array(variables["params"]["bias"]) if use_bias else None
    ours = conv.apply(variables, jnp.asarray(x))
    cotangent = rng.standard_normal(ours.shape).astype(np.float32)

    def loss(params, inputs):
        return jnp.sum(conv.apply({"params": params}, inputs) * cotangent)

    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))

    tx = to_torch(x).requires_grad_()
    tw = torch.from_numpy(kernel_hwio).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tb = torch.from_numpy(bias).requires_grad_() if use_bias else None
    reference = F.conv2d(tx, tw, tb, stride=stride, padding=pad, dilation=dilation)
    (reference * to_torch(cotangent)).sum().backward()
    np.testing.assert_allclose(ours, from_torch(reference.detach()), atol=1e-5)
    np.testing.assert_allclose(grad_x, from_torch(tx.grad), atol=1e-5)
    np.testing.assert_allclose(
        grad_params["kernel"], tw.grad.permute(2, 3, 1, 0).numpy(), atol=1e-4
    )
    if use_bias:
        np.testing.assert_allclose(grad_params["bias"], tb.grad.numpy(), atol=1e-4)
    # Pointwise convolutions are matmuls (fast weight gradients on CPU); the rest stay convs.
    jaxpr = str(jax.make_jaxpr(conv.apply)(variables, jnp.asarray(x)))
    assert ("conv_general_dilated" in jaxpr) == (kernel > 1)


def test_pointwise_matmul_can_be_switched_off_for_benchmarks(monkeypatch):
    conv = Conv(4, (1, 1), padding=((0, 0), (0, 0)))
    x = jnp.ones((1, 5, 5, 3))
    variables = conv.init(jax.random.key(0), x)
    monkeypatch.setattr(layers, "POINTWISE_AS_MATMUL", False)
    jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
    assert "conv_general_dilated" in jaxpr and "dot_general" not in jaxpr


def test_residual_relu_matches_torch_relu_with_gradients():
    x = np.array([-2.0, -0.0, 0.0, 1e-30, 1.5, np.inf, -np.inf, np.nan], np.float32)
    values = residual_relu(jnp.asarray(x))
    grad = jax.grad(lambda v: residual_relu(v).sum())(jnp.asarray(x))
    tx = torch.from_numpy(x).requires_grad_()
    torch.relu(tx).sum().backward()
    np.testing.assert_array_equal(values, torch.relu(torch.from_numpy(x)).numpy())  # NaN passes
    np.testing.assert_array_equal(grad, tx.grad.numpy())


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [
        ((2, 33, 30, 5), 3, 2, 1),  # the ResNet stem's pool, odd and even sizes
        ((1, 8, 8, 3), 3, 2, 1),
        ((2, 9, 7, 4), 2, 2, 0),  # FPA's 2×2 pool, odd sizes floored
        ((1, 6, 6, 2), 3, 1, 1),  # overlapping windows, stride 1
    ],
)
def test_max_pool_matches_torch_with_gradients(shape, window, stride, padding):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0] = np.maximum(x[0], 0)  # post-ReLU: many windows tie at 0
    x[-1, :3, :3] = 0.5  # a plateau: ties between positive values
    grad = rng.standard_normal(
        from_torch(F.max_pool2d(to_torch(x), window, stride, padding)).shape
    ).astype(np.float32)

    def ours(v):
        return layers.max_pool(v, (window,) * 2, (stride,) * 2, ((padding,) * 2,) * 2)

    out, vjp = jax.vjp(ours, jnp.asarray(x))
    (ours_grad,) = vjp(jnp.asarray(grad))
    xt = to_torch(x.copy()).requires_grad_()
    reference = F.max_pool2d(xt, window, stride, padding)
    reference.backward(to_torch(grad))
    np.testing.assert_array_equal(out, from_torch(reference.detach()))
    # torch gives each window's gradient to its first maximum; sums of overlapping windows
    # may round differently.
    np.testing.assert_allclose(ours_grad, from_torch(xt.grad), rtol=0, atol=1e-6)
    # And XLA's own max-pool gradient (select-and-scatter) agrees; ours has none of it.
    flax_grad = jax.grad(
        lambda v: jnp.vdot(
            nn.max_pool(v, (window,) * 2, (stride,) * 2, ((padding,) * 2,) * 2), grad
        )
    )(x)
    np.testing.assert_allclose(ours_grad, flax_grad, rtol=0, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda v: jax.vjp(ours, v)[1](grad))(x))
    assert "select_and" not in jaxpr and "scatter" not in jaxpr, jaxpr


def test_resnet_block_outputs_are_computed_once():
    """No XLA fusion recomputes the residual stream of earlier blocks (it did with `nn.relu`).

    XLA:CPU duplicated each block's `max(x, 0)` output into its consumers, so the fusion that
    produced layer3's last output read the BatchNorm outputs of every block before it.
    """
    model = ResNet(depth=50, output_stride=16)
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), images, train=False))()
    hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
    widest = 0
    for line in hlo.compile().as_text().splitlines():
        if re.search(r"= \S+ fusion\(", line):
            operands = line.split("fusion(", 1)[1].split("), kind=", 1)[0]
            widest = max(widest, operands.count("%"))
    # A block's own BN parameters, its conv output and the shortcut: a handful. Recomputing
    # the 6 blocks of layer3 would read 5 inputs per block, ~30.
    assert widest <= 12, widest
