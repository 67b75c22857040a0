"""Shared test settings: the CPU kernels users get; float32 matmuls at full precision."""

import jax

from pan_jax import xla_flags

# The CPU kernels the entry points use, so tests check what users run. Before any computation.
xla_flags.use_fast_cpu_kernels()
jax.config.update("jax_default_matmul_precision", "highest")
