"""Feature Pyramid Attention (FPA), Global Attention Upsample (GAU) and the PAN decoder.

Every switch of the paper's ablations (Tables 1 and 3) is a field, and the defaults of
`FPA`/`GAU` are segmentation_models_pytorch's (SMP), so that `models.create("pan_smp")`
reproduces SMP's logits from SMP's weights; `models.create("pan")` sets the paper's choices.
Submodule names follow SMP's state dict (`branch1`, `mid`, `down1`..`down3_2`, `conv1`, `conv2`;
GAU `attention`, `low`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models.layers import Conv, ConvBN, Dtype, pool2x2, resize_bilinear

# Below 8×8 at the top of the backbone the three 2×2 poolings of the pyramid run out of pixels.
MIN_PYRAMID_INPUT = 8


class FPA(nn.Module):
    """Feature Pyramid Attention on the top feature map: `attention · mid(x) + global(x)`.

    Attributes:
      features: output width (the decoder width).
      pyramid_features: width of the pyramid; 1 (SMP: one spatial attention map broadcast over
        the channels) or `features` (a per-channel pixel attention).
      kernels: kernel sizes of the pyramid levels at 1/2, 1/4, 1/8 of the input: (7, 5, 3) is the
        paper's C357, (3, 3, 3) its C333.
      pooling: "avg" (the paper's choice, Table 1) or "max" (SMP).
      global_branch: add the global-pooling branch (GP in Table 1).
      attention: "pyramid" or "se" (Table 1's SE row: channel attention instead of the pyramid).
      conv_bias: biases on the convs before BN (SMP has them).
      align_corners: of the bilinear upsampling inside the module.
    """

    features: int = 32
    pyramid_features: int = 1
    kernels: Sequence[int] = (7, 5, 3)
    pooling: str = "max"
    global_branch: bool = True
    attention: str = "pyramid"
    conv_bias: bool = True
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    def _conv_bn(self, features: int, kernel: int, name: str) -> ConvBN:
        return ConvBN(features, kernel, use_bias=self.conv_bias, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        height, width = x.shape[1], x.shape[2]
        mid = self._conv_bn(self.features, 1, "mid")(x, train)

        if self.attention == "pyramid":
            if self.pyramid_features not in (1, self.features):
                raise ValueError(
                    f"FPA pyramid_features must be 1 or features={self.features}, "
                    f"got {self.pyramid_features}"
                )
            if min(height, width) < MIN_PYRAMID_INPUT:
                raise ValueError(
                    f"FPA needs a top feature map of at least "
                    f"{MIN_PYRAMID_INPUT}×{MIN_PYRAMID_INPUT}, "
                    f"got {height}×{width}; use larger inputs or a smaller output stride"
                )
            k1, k2, k3 = self.kernels
            p = self.pyramid_features
            x1 = self._conv_bn(p, k1, "down1")(pool2x2(x, self.pooling), train)
            x2 = self._conv_bn(p, k2, "down2")(pool2x2(x1, self.pooling), train)
            x3 = self._conv_bn(p, k3, "down3_1")(pool2x2(x2, self.pooling), train)
            x3 = self._conv_bn(p, k3, "down3_2")(x3, train)
            up = resize_bilinear(x3, (height // 4, width // 4), self.align_corners)
            up = self._conv_bn(p, k2, "conv2")(x2, train) + up
            up = resize_bilinear(up, (height // 2, width // 2), self.align_corners)
            up = self._conv_bn(p, k1, "conv1")(x1, train) + up
            attention = resize_bilinear(up, (height, width), self.align_corners)
        elif self.attention == "se":
            squeeze = jnp.mean(x, axis=(1, 2), keepdims=True)
            squeeze = nn.relu(
                Conv(max(x.shape[-1] // 16, 1), (1, 1), dtype=self.dtype, name="se_reduce")(squeeze)
            )
            attention = nn.sigmoid(
                Conv(self.features, (1, 1), dtype=self.dtype, name="se_expand")(squeeze)
            )
        else:
            raise ValueError(f"FPA attention must be 'pyramid' or 'se', got {self.attention!r}")

        out = attention * mid
        if self.global_branch:
            pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
            pooled = self._conv_bn(self.features, 1, "branch1")(pooled, train)
            out = out + resize_bilinear(pooled, (height, width), self.align_corners)
        return out


class GAU(nn.Module):
    """Global Attention Upsample: `upsample(high) + low_conv(low) · gate(global_pool(high))`.

    Attributes:
      features: output width (equal to the width of `high`).
      low_kernel: 3 (the paper's best, Table 3) or 1.
      global_attention: use the global-pooling attention (off = Table 3's first row).
      gate: "sigmoid" (SMP: 1×1 conv + BN + sigmoid) or "relu" (the paper: 1×1 conv + BN + ReLU).
    """

    features: int = 32
    low_kernel: int = 3
    global_attention: bool = True
    gate: str = "sigmoid"
    conv_bias: bool = True
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array, train: bool) -> jax.Array:
        high_up = resize_bilinear(high, low.shape[1:3], self.align_corners)
        low = ConvBN(
            self.features, self.low_kernel, use_bias=self.conv_bias, dtype=self.dtype, name="low"
        )(low, train)
        if self.global_attention:
            pooled = jnp.mean(high, axis=(1, 2), keepdims=True)
            weights = ConvBN(
                self.features,
                1,
                use_bias=self.conv_bias,
                relu=False,
                dtype=self.dtype,
                name="attention",
            )(pooled, train)
            if self.gate == "sigmoid":
                weights = nn.sigmoid(weights)
            elif self.gate == "relu":
                weights = nn.relu(weights)
            else:
                raise ValueError(f"GAU gate must be 'sigmoid' or 'relu', got {self.gate!r}")
            low = low * weights
        return high_up + low


class PANDecoder(nn.Module):
    """FPA on layer4, then GAU with layer3, layer2, layer1 (strides 16 → 4 at output stride 16).

    With `use_fpa=False` the top feature is a 1×1 ConvBN projection (the paper's "GAU only");
    with `use_gau=False` the FPA output is returned at the backbone's stride ("FPA only").
    The `fpa_*`/`gau_*` fields are those of `FPA` and `GAU`; the defaults are SMP's.
    """

    features: int = 32
    use_fpa: bool = True
    use_gau: bool = True
    pyramid_features: int = 1
    fpa_kernels: Sequence[int] = (7, 5, 3)
    fpa_pooling: str = "max"
    fpa_global_branch: bool = True
    fpa_attention: str = "pyramid"
    gau_low_kernel: int = 3
    gau_global_attention: bool = True
    gau_gate: str = "sigmoid"
    conv_bias: bool = True
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    @property
    def min_top_feature_size(self) -> int:
        """The smallest layer4 map this decoder takes: only FPA's pyramid pools it down."""
        return MIN_PYRAMID_INPUT if self.use_fpa and self.fpa_attention == "pyramid" else 1

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        c1, c2, c3, c4 = features
        if self.use_fpa:
            out = FPA(
                self.features,
                pyramid_features=self.pyramid_features,
                kernels=tuple(self.fpa_kernels),
                pooling=self.fpa_pooling,
                global_branch=self.fpa_global_branch,
                attention=self.fpa_attention,
                conv_bias=self.conv_bias,
                align_corners=self.align_corners,
                dtype=self.dtype,
                name="fpa",
            )(c4, train)
        else:
            out = ConvBN(self.features, 1, use_bias=self.conv_bias, dtype=self.dtype, name="top")(
                c4, train
            )
        if self.use_gau:
            for name, low in (("gau3", c3), ("gau2", c2), ("gau1", c1)):
                out = GAU(
                    self.features,
                    low_kernel=self.gau_low_kernel,
                    global_attention=self.gau_global_attention,
                    gate=self.gau_gate,
                    conv_bias=self.conv_bias,
                    align_corners=self.align_corners,
                    dtype=self.dtype,
                    name=name,
                )(low, out, train)
        return out
