"""Layers shared by the backbone and the decoders, with PyTorch's exact semantics.

Everything here works on NHWC arrays. Resizing and adaptive pooling are written as small
matrices applied with einsum: they are exact for any input and output size (the torch
formulas, not `jax.image.resize`'s half-pixel, antialiased ones) and lower to matmuls that
fuse well on accelerators.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch initialisations, expressed as flax initializers.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
kaiming_uniform_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()


# Read when a model is traced; `python -m pan_jax.bench --pointwise_conv=conv` sets it to
# compare the two lowerings on a device.
POINTWISE_AS_MATMUL = True
# Likewise `--bn_moments=two_pass`: BatchNorm's training statistics in two passes over the
# activations (mean, then the mean squared deviation) instead of one.
BATCHNORM_ONE_PASS = True

# flax's NHWC/HWIO convolution dimension numbers, as `lax.ConvDimensionNumbers` spells them.
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` that computes unpadded 1×1 NHWC convolutions as a matmul.

    Equal to the convolution (a stride is a subsampling before the matmul). XLA:CPU runs the
    matmul and, above all, its weight gradient far faster than a 1×1 convolution: ResNet-101
    at 512² on 2 cores, forward 1.66 → 1.54 s, training step 8.8 → 7.9 s (docs/benchmarks.md).
    On GPUs and TPUs both are tensor-core/MXU GEMMs (cuBLAS/Triton instead of cuDNN on GPUs);
    `python -m pan_jax.bench --pointwise_conv=conv` measures the convolution for comparison.
    """
    pointwise = (
        POINTWISE_AS_MATMUL
        and lhs.ndim == 4
        and rhs.shape[:2] == (1, 1)
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and not isinstance(padding, str)
        and all(tuple(p) == (0, 0) for p in padding)
        and tuple(dimension_numbers or ()) == _NHWC_HWIO
    )
    if not pointwise:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    stride_h, stride_w = window_strides
    if (stride_h, stride_w) != (1, 1):
        lhs = lhs[:, ::stride_h, ::stride_w, :]
    return jax.lax.dot_general(
        lhs,
        rhs[0, 0],
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=kwargs.get("preferred_element_type"),
    )


# `nn.Conv` with 1×1 convolutions as matmuls; same parameters, same results.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def residual_relu(x: jax.Array) -> jax.Array:
    """ReLU for the output of a residual block: `nn.relu`'s values and gradient, as a select.

    `where(x <= 0, 0, x)` equals torch's ReLU (NaN passes, gradient 0 at 0). Written as a select
    because XLA treats `max(x, 0)` as a unary op that is free to duplicate into every consumer:
    XLA:CPU then never materializes a block's output, and every block recomputes the residual
    stream of all the blocks before it (one fusion of layer3_22 in ResNet-101 read the outputs
    of all 23 blocks). Materialized once, ResNet-101 at 512² on 2 cores runs forward in 1.66
    instead of 2.30 s and the training step in 8.8 instead of 13.0 s (docs/benchmarks.md).
    """
    return jnp.where(x <= 0, 0, x)


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) weights of 1-D linear interpolation as `torch.nn.functional.interpolate`.

    align_corners=True maps the corner pixels onto each other (src = dst·(in−1)/(out−1));
    align_corners=False uses half-pixel centres (src = (dst+½)·in/out − ½, clamped at 0) and
    no antialiasing, as torch's `mode="bilinear"` does when downsampling.
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix.astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool) -> jax.Array:
    """Bilinear resize of NHWC `x` to `size` = (H, W), equal to torch's `F.interpolate`."""
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    if in_h == 1 and in_w == 1:  # a global-pooling branch: the resize is a broadcast
        return jnp.broadcast_to(x, (x.shape[0], out_h, out_w, x.shape[3]))
    # In float32 whatever x's dtype, rounded once at the end, as torch's bf16 interpolate: bf16
    # weights and a bf16 result between the two passes had 1.6× its error (0.0066 vs 0.0041
    # mean absolute on values near 3, 64 → 128 with align_corners). 0.3% of PAN's FLOPs.
    resized = x.astype(jnp.float32)
    if in_h != out_h:
        rows = jnp.asarray(interpolation_matrix(in_h, out_h, align_corners))
        resized = jnp.einsum("oh,nhwc->nowc", rows, resized)
    if in_w != out_w:
        cols = jnp.asarray(interpolation_matrix(in_w, out_w, align_corners))
        resized = jnp.einsum("ow,nhwc->nhoc", cols, resized)
    return resized.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def adaptive_pool_windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's `AdaptiveAvgPool` windows along one axis: an (out_size, in_size) 0/1 matrix
    marking each output's window, and each window's length."""
    members = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        members[i, start:end] = 1.0
    return members, members.sum(axis=1)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch `AdaptiveAvgPool2d(size)` on NHWC `x`: window sums accumulated in float32, then
    divided by the window's size, as torch does in bf16 too (weights of 1/n in x's dtype would
    be off by up to 0.4% in bf16, the same sign for every element: a 600² map of ones pooled
    to 2×2 gave 0.992)."""
    if size == 1:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    rows, row_counts = adaptive_pool_windows(x.shape[1], size)
    cols, col_counts = adaptive_pool_windows(x.shape[2], size)
    sums = jnp.einsum(
        "oh,nhwc->nowc", jnp.asarray(rows, x.dtype), x, preferred_element_type=jnp.float32
    )
    sums = jnp.einsum("ow,nhwc->nhoc", jnp.asarray(cols, jnp.float32), sums)
    scale = 1.0 / np.outer(row_counts, col_counts).astype(np.float32)
    return (sums * scale[None, :, :, None]).astype(x.dtype)


def _window_slices(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Any
) -> list[jax.Array]:
    """The strided views of `x` (padded with −inf) that are each window's elements, row-major."""
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
    n, h, w, c = x.shape
    out_h, out_w = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    return [
        jax.lax.slice(
            x, (0, dy, dx, 0), (n, dy + sh * (out_h - 1) + 1, dx + sw * (out_w - 1) + 1, c),
            (1, sh, sw, 1),
        )
        for dy in range(kh)
        for dx in range(kw)
    ]  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window: Any, strides: Any, padding: Any, size: Any) -> jax.Array:
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_forward(x, window, strides, padding, size):
    views = _window_slices(x, window, strides, padding)
    best, index = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for k, view in enumerate(views[1:], start=1):
        index = jnp.where(view > best, jnp.int8(k), index)  # strict: a tie keeps the first
        best = jnp.maximum(best, view)  # propagates NaN as the primal does
    return best, index


def _max_pool_backward(window, strides, padding, size, index, grad):
    (kh, kw), (sh, sw), ((top, bottom), (left, right)), (h, w) = window, strides, padding, size
    out_h, out_w = index.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    total = None
    for k in range(kh * kw):
        dy, dx = divmod(k, kw)
        # Window (i, j)'s element k sits at padded row dy + sh·i, column dx + sw·j.
        rows = (dy, h + top + bottom - dy - sh * (out_h - 1) - 1, sh - 1)
        cols = (dx, w + left + right - dx - sw * (out_w - 1) - 1, sw - 1)
        term = jnp.where(index == k, grad, zero)
        term = jax.lax.pad(term, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
        total = term if total is None else total + term
    return (total[:, top : top + h, left : left + w],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "VALID",
) -> jax.Array:
    """`nn.max_pool` on NHWC `x`, with a gradient XLA computes an order of magnitude faster.

    Same values; the gradient goes to the first maximum of each window in row-major order, as
    torch's `max_pool2d` and XLA's select-and-scatter route it. XLA:CPU lowers
    select-and-scatter to a scatter with iota-built indices (the ResNet stem's 3×3/2 pool
    forward + backward took 346 ms at 2×256²×128); here the forward pass records which element
    won (int8) and the backward pass is one fused loop of masked strided pads (80 ms). A
    `jax.custom_vjp`: reverse mode only (`jax.jvp` through it raises).
    """
    if padding == "VALID":
        padding = ((0, 0), (0, 0))
    elif isinstance(padding, str):
        raise ValueError(f"max_pool: padding must be 'VALID' or explicit pairs, got {padding!r}")
    if window[0] * window[1] > 127:
        raise ValueError(f"max_pool: window {window} has more elements than an int8 index holds")
    window, strides = tuple(window), tuple(strides)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _max_pool(x, window, strides, padding, tuple(x.shape[1:3]))


def pool2x2(x: jax.Array, kind: str) -> jax.Array:
    """2×2 stride-2 pooling that floors odd sizes, like torch's `MaxPool2d(2)`/`AvgPool2d(2)`."""
    if kind == "max":
        return max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    raise ValueError(f"pooling must be 'avg' or 'max', got {kind!r}")


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics, statistics always in float32.

    Differences from `flax.linen.BatchNorm` that matter for parity with PyTorch training: the
    running variance is updated with the unbiased batch variance, and `momentum` is PyTorch's
    (weight of the new batch). Under `jax.jit` over a batch sharded on a mesh the batch
    statistics are global, i.e. this is SyncBN; inside `shard_map` pass `axis_name`.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )

        if train:
            x32 = x.astype(jnp.float32)
            reduce_axes = tuple(range(x.ndim - 1))
            count = np.prod([x.shape[a] for a in reduce_axes])
            # Both moments from one pass over x: two sibling reductions, which XLA can fuse
            # into one kernel. The two-pass form (mean, then the mean squared deviation) reads
            # every activation twice. The moments are taken about a shift near the mean: plain
            # E[x²] − E[x]² cancels catastrophically in float32 when |mean| ≫ std, e.g. on the
            # globally pooled 1×1 maps of FPA and GAU. The shift is the mean of a strided
            # subsample, a small read. The variance does not depend on the shift, so no gradient
            # flows through it.
            if BATCHNORM_ONE_PASS:
                sample = _spatial_subsample(x).astype(jnp.float32)
                shift = jax.lax.stop_gradient(jnp.mean(sample, reduce_axes))
            else:
                shift = jax.lax.stop_gradient(jnp.mean(x32, reduce_axes))  # the exact mean
            if self.axis_name is not None:
                shift = jax.lax.pmean(shift, self.axis_name)
            centered = x32 - shift
            moments = jnp.mean(centered, reduce_axes), jnp.mean(jnp.square(centered), reduce_axes)
            if self.axis_name is not None:
                moments = jax.lax.pmean(moments, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            offset, mean_square = moments
            mean = shift + offset
            var = jnp.maximum(mean_square - jnp.square(offset), 0.0)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value

        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        return (x.astype(jnp.float32) * multiplier + offset).astype(self.dtype)


def _spatial_subsample(x: jax.Array, samples_per_side: int = 8) -> jax.Array:
    """Every image of `x` (N, ..., C) at a stride leaving about `samples_per_side` positions
    along each spatial axis (all of a small map)."""
    strides = [max(1, size // samples_per_side) for size in x.shape[1:-1]]
    return x[(slice(None), *(slice(None, None, stride) for stride in strides), slice(None))]


class ConvBN(nn.Module):
    """Conv → BatchNorm → optional ReLU; torch-style symmetric padding (`dilation·(k//2)`)."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    use_bias: bool = False
    relu: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = kaiming_uniform_fan_in

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.dilation * (self.kernel_size // 2)
        x = Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=self.dilation,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name="conv",
        )(x)
        x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
        return nn.relu(x) if self.relu else x
