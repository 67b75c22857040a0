"""The segmentation model: backbone → decoder → classifier → logits at the input resolution."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models.layers import Conv, Dtype, resize_bilinear, xavier_uniform
from pan_jax.models.resnet import ResNet


class SegmentationModel(nn.Module):
    """`logits = resize(classifier(decoder(backbone(images))), input size)`, in float32.

    Attributes:
      backbone: a `ResNet`.
      decoder: a module taking the four backbone features and `train`, or None to classify
        layer4 directly (the FCN baseline).
      num_classes: output channels.
      head_kernel: kernel of the classifier conv (3 in SMP's PAN, 1 for the baselines).
      align_corners: of the final bilinear upsampling.
    """

    backbone: ResNet
    decoder: nn.Module | None
    num_classes: int
    head_kernel: int = 3
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    @property
    def min_input_size(self) -> int:
        """Output stride × the smallest top feature map the decoder takes (FPA pools it 3×)."""
        top = 1 if self.decoder is None else self.decoder.min_top_feature_size
        return top * self.backbone.output_stride

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC (N, H, W, C), got shape {images.shape}")
        height, width = images.shape[1:3]
        if min(height, width) < self.min_input_size:
            raise ValueError(
                f"input of {height}×{width} px is too small: this model (output stride "
                f"{self.backbone.output_stride}) needs H and W ≥ {self.min_input_size}"
            )
        features = self.backbone(images, train)
        x = features[-1] if self.decoder is None else self.decoder(features, train)
        pad = self.head_kernel // 2
        x = Conv(
            self.num_classes,
            (self.head_kernel, self.head_kernel),
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            kernel_init=xavier_uniform,
            name="head",
        )(x)
        return resize_bilinear(x.astype(jnp.float32), (height, width), self.align_corners)
