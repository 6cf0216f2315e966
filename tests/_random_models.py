"""Models with random weights drawn in numpy (no XLA compile of an init program)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models import construct


def random_model(make, seed):
    """``make()``'s shapes with kernels ~ N(0, 1 / fan_in) and every other parameter
    ~ N(0, 0.3^2), so AdaLN gains are far from 0 and every path carries signal."""
    graphdef, state = nnx.split(construct.shape_model(make))
    rng = np.random.default_rng(seed)

    def draw(x):
        std = 1 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else 0.3
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))
