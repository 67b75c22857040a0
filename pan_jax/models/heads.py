"""The context modules of the paper's Table 2 baselines: PSPNet pyramid pooling, DeepLabV3 ASPP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models.layers import ConvBN, Dtype, adaptive_avg_pool, resize_bilinear


class PyramidPoolingDecoder(nn.Module):
    """PSPNet's pyramid pooling module on layer4: bins (1, 2, 3, 6), concat, 3×3 ConvBN, dropout."""

    features: int = 512
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout_rate: float = 0.1
    align_corners: bool = True
    dtype: Dtype = jnp.float32
    # Adaptive pooling to more bins than pixels repeats pixels, as in torch.
    min_top_feature_size: ClassVar[int] = 1

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        x = features[-1]
        size = x.shape[1:3]
        branches = [x]
        for bin_size in self.bins:
            pooled = adaptive_avg_pool(x, bin_size)
            pooled = ConvBN(
                x.shape[-1] // len(self.bins), 1, dtype=self.dtype, name=f"pool{bin_size}"
            )(pooled, train)
            branches.append(resize_bilinear(pooled, size, self.align_corners))
        x = ConvBN(self.features, 3, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate(branches, axis=-1), train
        )
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class ASPPDecoder(nn.Module):
    """DeepLabV3's head as torchvision builds it: ASPP (1×1, three atrous 3×3, image pooling),
    1×1 projection with dropout, then a 3×3 ConvBN. Rates are for output stride 16; they double
    at output stride 8."""

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    output_stride: int = 16
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    min_top_feature_size: ClassVar[int] = 1

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        x = features[-1]
        scale = 16 // self.output_stride if self.output_stride <= 16 else 1
        branches = [ConvBN(self.features, 1, dtype=self.dtype, name="aspp0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(
                ConvBN(
                    self.features, 3, dilation=rate * scale, dtype=self.dtype, name=f"aspp{i + 1}"
                )(x, train)
            )
        pooled = ConvBN(self.features, 1, dtype=self.dtype, name="image_pool")(
            jnp.mean(x, axis=(1, 2), keepdims=True), train
        )
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        x = ConvBN(self.features, 1, dtype=self.dtype, name="project")(
            jnp.concatenate(branches, axis=-1), train
        )
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return ConvBN(self.features, 3, dtype=self.dtype, name="head_conv")(x, train)
