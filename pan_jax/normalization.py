"""The models' input contract: RGB with ImageNet statistics, `(x − mean) / std` in float32.

Training, evaluation and prediction ship uint8 images and normalize them on the device
(`normalize_crops`): a quarter of the bytes through grain's shared memory and the host-to-device
copy, and no per-pixel float work on the CPU cores that decode. Evaluation rescales its views
while they are uint8, as mmseg does, so its multi-scale inputs round as mmseg's.
"""

from typing import Any

import numpy as np

# ImageNet statistics in 0..255 pixel units, as torchvision/timm/mmseg backbones expect.
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)


def normalize(images_uint8: Any) -> Any:
    """(..., 3) uint8 RGB -> float32 (x - mean) / std; works on numpy and jax arrays."""
    return (images_uint8.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def normalize_crops(images_uint8: Any, image_size: Any) -> Any:
    """Normalized (B, H, W, 3) float32 crops on the device, 0 (the mean) outside each crop's
    `image_size` (B, 2) = (height, width): a crop of a smaller image is padded bottom/right.
    Equals `normalize` within one float32 ulp (XLA divides by a constant via its reciprocal)."""
    # jax only here: grain's worker processes import this module and need no jax.
    import jax.numpy as jnp
    from jax import lax

    shape = images_uint8.shape[:3]
    rows = lax.broadcasted_iota(jnp.int32, shape, 1) < image_size[:, 0, None, None]
    cols = lax.broadcasted_iota(jnp.int32, shape, 2) < image_size[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], normalize(images_uint8), 0.0)
