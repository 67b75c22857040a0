"""Shared test settings: full-precision float32 matmuls, so parity tests compare like with like."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
