"""Helpers shared by several test files."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, seed=0):
    """He-initialised weights and identity BatchNorm, without compiling `model.init` (slow)."""
    size = model.min_input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)
        return (np.ones if path[-1].key in ("var", "scale") else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
