"""Pyramid Attention Network (Li et al., BMVC 2018) for semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"
