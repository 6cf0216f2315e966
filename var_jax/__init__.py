"""var_jax: Visual Autoregressive modelling (next-scale prediction) in JAX."""

__version__ = "0.1.0"
