"""Dilated ResNets (v1.5: stride on the 3×3 conv) with torchvision, deep32 and deep64 stems.

Parameter names follow torchvision so checkpoints convert one to one: `layer{1..4}_{block}`
holding `conv1/bn1/conv2/bn2[/conv3/bn3]` and `downsample_conv/downsample_bn`; the stem is
`stem_conv{i}/stem_bn{i}`.

Dilation rules (where output stride 8 or 16 replaces strides by dilation):
- "torchvision" (torchvision, timm, mmseg's `contract_dilation`): the first block of a dilated
  stage keeps the previous dilation, the later blocks use the new one;
- "smp" (segmentation_models_pytorch's `make_dilated`): every conv of the stage is dilated,
  the first block included.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models.layers import (
    BatchNorm,
    Conv,
    Dtype,
    kaiming_normal_fan_out,
    max_pool,
    residual_relu,
)

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STEM_WIDTHS = {"torchvision": (64,), "deep32": (32, 32, 64), "deep64": (64, 64, 128)}
DILATION_RULES = ("torchvision", "smp")


def stage_dilations(output_stride: int) -> tuple[tuple[int, int], ...]:
    """(stride, dilation) of layer1..layer4 for an output stride of 8, 16 or 32."""
    if output_stride == 32:
        return ((1, 1), (2, 1), (2, 1), (2, 1))
    if output_stride == 16:
        return ((1, 1), (2, 1), (2, 1), (1, 2))
    if output_stride == 8:
        return ((1, 1), (2, 1), (1, 2), (1, 4))
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


def _conv(features: int, kernel: int, stride: int, dilation: int, dtype: Dtype, name: str):
    pad = dilation * (kernel // 2)
    return Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        use_bias=False,
        dtype=dtype,
        kernel_init=kaiming_normal_fan_out,
        name=name,
    )


class Shortcut(nn.Module):
    """Projection shortcut: 1×1 conv + BN, or timm's "d" variant (average pool, then 1×1 conv)."""

    features: int
    stride: int
    dilation: int
    avg_down: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stride = self.stride
        if self.avg_down:
            if stride > 1:
                # AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False).
                pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
                x = nn.avg_pool(x, (2, 2), (2, 2), padding=pad, count_include_pad=False)
            elif self.dilation > 1:
                # timm's AvgPool2dSame(2, stride=1): zero pad bottom/right, zeros are averaged in.
                x = nn.avg_pool(x, (2, 2), (1, 1), padding=((0, 1), (0, 1)), count_include_pad=True)
            stride = 1
        x = _conv(self.features, 1, stride, 1, self.dtype, "downsample_conv")(x)
        return BatchNorm(dtype=self.dtype, name="downsample_bn")(x, train)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    first_dilation: int = 1
    dilation: int = 1
    projection: bool = False
    avg_down: bool = False
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        y = _conv(self.features, 3, self.stride, self.first_dilation, self.dtype, "conv1")(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = _conv(self.features, 3, 1, self.dilation, self.dtype, "conv2")(y)
        y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
        if self.projection:
            shortcut = Shortcut(
                self.features,
                self.stride,
                self.dilation,
                self.avg_down,
                self.dtype,
                name="downsample",
            )(x, train)
        return residual_relu(y + shortcut)


class Bottleneck(nn.Module):
    features: int
    stride: int = 1
    first_dilation: int = 1
    dilation: int = 1
    projection: bool = False
    avg_down: bool = False
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        y = _conv(self.features, 1, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = _conv(self.features, 3, self.stride, self.first_dilation, self.dtype, "conv2")(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
        y = _conv(self.features * 4, 1, 1, 1, self.dtype, "conv3")(y)
        y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
        if self.projection:
            shortcut = Shortcut(
                self.features * 4,
                self.stride,
                self.dilation,
                self.avg_down,
                self.dtype,
                name="downsample",
            )(x, train)
        return residual_relu(y + shortcut)


class ResNet(nn.Module):
    """Dilated ResNet returning the features of layer1..layer4 (strides 4, 8, 8-16, 8-32).

    Attributes:
      depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck v1.5).
      stem: "torchvision" (7×7), "deep32" (3×3 convs 32-32-64) or "deep64" (64-64-128).
      output_stride: 8, 16 or 32.
      dilation_rule: "torchvision" or "smp" (see the module docstring).
      avg_down: timm's "d" shortcut (average pool before the 1×1 projection).
    """

    depth: int = 101
    stem: str = "torchvision"
    output_stride: int = 16
    dilation_rule: str = "torchvision"
    avg_down: bool = False
    dtype: Dtype = jnp.float32

    def setup_check(self) -> None:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        if self.stem not in STEM_WIDTHS:
            raise ValueError(f"ResNet stem must be one of {sorted(STEM_WIDTHS)}, got {self.stem!r}")
        if self.dilation_rule not in DILATION_RULES:
            raise ValueError(
                f"dilation_rule must be one of {DILATION_RULES}, got {self.dilation_rule!r}"
            )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        self.setup_check()
        x = x.astype(self.dtype)
        widths = STEM_WIDTHS[self.stem]
        for i, width in enumerate(widths):
            kernel, stride = (7, 2) if self.stem == "torchvision" else (3, 2 if i == 0 else 1)
            x = _conv(width, kernel, stride, 1, self.dtype, f"stem_conv{i}")(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=f"stem_bn{i}")(x, train))
        x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_cls: Any = BasicBlock if self.depth < 50 else Bottleneck
        in_features = widths[-1]
        previous_dilation = 1
        features = []
        for stage, (num_blocks, (stride, dilation)) in enumerate(
            zip(STAGE_SIZES[self.depth], stage_dilations(self.output_stride), strict=True)
        ):
            width = 64 * 2**stage
            first_dilation = dilation if self.dilation_rule == "smp" else previous_dilation
            for block in range(num_blocks):
                x = block_cls(
                    width,
                    stride=stride if block == 0 else 1,
                    first_dilation=first_dilation if block == 0 else dilation,
                    dilation=dilation,
                    projection=block == 0
                    and (stride != 1 or in_features != width * block_cls.expansion),
                    avg_down=self.avg_down,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
            in_features = width * block_cls.expansion
            previous_dilation = dilation
            features.append(x)
        return features
