"""Resize, adaptive pooling and BatchNorm equal PyTorch's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pan_jax.models.layers import BatchNorm, adaptive_avg_pool, resize_bilinear


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


@pytest.mark.parametrize("in_size, bins", [((13, 17), 6), ((6, 6), 3), ((7, 5), 2), ((9, 11), 1)])
def test_adaptive_avg_pool_matches_torch(in_size, bins):
    x = np.random.default_rng(1).standard_normal((2, *in_size, 4)).astype(np.float32)
    reference = F.adaptive_avg_pool2d(to_torch(x), bins)
    np.testing.assert_allclose(
        np.asarray(adaptive_avg_pool(jnp.asarray(x), bins)), from_torch(reference), atol=1e-6
    )


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


def test_batchnorm_bf16_keeps_float32_statistics():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 8)), jnp.bfloat16)
    bn = BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((variables, updates)))
    assert isinstance(bn, nn.Module)
