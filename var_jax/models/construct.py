"""Building models without paying for their initialisation: the one home of abstract
construction, used by the converters, the pretrained pipeline, the training loop and the
parameter counts.

Why: drawing the random weights of a 2B-parameter VAR only to overwrite them with a checkpoint
costs minutes and twice the memory. ``nnx.eval_shape`` traces the constructor without running
it; the parameters are then filled with zeros (``abstract_model``) or only their shapes are
read (``param_count``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def shape_model(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()`` traced abstractly: a module whose variables are ``jax.ShapeDtypeStruct``."""
    return nnx.eval_shape(make)


def abstract_model(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()`` built without drawing random weights: shapes first, zeros filled in (for a
    checkpoint to overwrite)."""
    graphdef, state = nnx.split(shape_model(make))
    state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
    return nnx.merge(graphdef, state)


def param_count(make: Callable[[], nnx.Module]) -> int:
    """Number of parameters of ``make()``, from shapes only (nothing is allocated)."""
    state = nnx.state(shape_model(make), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
