"""Optimizer pieces of the official VAR recipe: the 'lin0' schedule, the weight-decay cosine and
the decay / no-decay parameter groups, as optax transformations; and Muon (optax.contrib) for the
blocks' matrices, an option that trains small VARs in far fewer steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from var_jax.models import decay


def lin0_fraction(step, total_steps: int, warmup_steps: int, wp0: float = 0.005,
                  wpe: float = 0.01):
    """The official 'lin0' learning-rate factor (fraction of the peak) at `step`.

    Linear warmup from wp0 to 1 over `warmup_steps`, flat while the post-warmup progress is
    below 5%, then linear down to `wpe` at the last step.
    """
    step = jnp.asarray(step, jnp.float32)
    wp = float(max(warmup_steps, 0))
    warm = wp0 + (1.0 - wp0) * step / max(wp, 1.0)
    pasd = (step - wp) / max(total_steps - 1 - wp, 1.0)
    decay = jnp.where(pasd < 0.05, 1.0, wpe + (1.0 - wpe) * (1.0 - pasd) / 0.95)
    return jnp.where(step < wp, warm, decay)


def lin0_schedule(peak_lr: float, total_steps: int, warmup_steps: int, wp0: float = 0.005,
                  wpe: float = 0.01) -> optax.Schedule:
    return lambda step: peak_lr * lin0_fraction(step, total_steps, warmup_steps, wp0, wpe)


def wd_schedule(twd: float, twde: float, total_steps: int) -> optax.Schedule:
    """Cosine from twd (step 0) to twde (last step); constant when twde == twd."""
    def fn(step):
        t = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
        return twde + (twd - twde) * (0.5 + 0.5 * jnp.cos(math.pi * t))
    return fn


# The one weight-decay rule (by parameter name), shared by every recipe.
decay_mask = decay.weight_decay_mask


def peak_lr(base_lr: float, global_batch: int) -> float:
    """The official linear scaling rule: lr = base * batch / 256."""
    return base_lr * global_batch / 256.0


def make_optimizer(*, lr: optax.Schedule, wd: optax.Schedule | float, b1: float, b2: float,
                   eps: float = 1e-8, clip: float = 2.0,
                   mask=decay_mask) -> optax.GradientTransformation:
    """AdamW with decoupled, masked weight decay and global-norm clipping (clip <= 0: off).

    `mask(params) -> bools` picks the decayed parameters (default: `decay_mask`, the official
    groups of `var_jax.models.decay`)."""
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(wd, mask=mask),
              optax.scale_by_learning_rate(lr)]
    return optax.chain(*parts)


OPTIMIZERS = ("adamw", "muon")


def muon_dimension_numbers(matrix_axes):
    """A function params -> pytree of `optax.contrib.MuonDimensionNumbers` (or None: Adam) from
    a per-leaf rule `matrix_axes(path, shape) -> (input axes, output axes) | None`."""
    def leaf(path, x):
        axes = matrix_axes(path, x.shape)
        return None if axes is None else contrib.MuonDimensionNumbers(*axes)

    return lambda params: jax.tree_util.tree_map_with_path(leaf, params)


def make_muon_optimizer(*, lr: optax.Schedule, muon_lr: optax.Schedule, b1: float, b2: float,
                        matrix_axes, eps: float = 1e-8,
                        clip: float = 2.0) -> optax.GradientTransformation:
    """Muon on the matrices `matrix_axes` names (momentum 0.95, Nesterov, five Newton-Schulz
    steps, updates scaled by their shape: `optax.contrib.muon`'s defaults) at `muon_lr`, Adam
    (b1, b2; Nesterov like the Muon side) on every other parameter at `lr`, after global-norm
    clipping (clip <= 0: off). No weight decay: none was measured with it."""
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts.append(contrib.muon(muon_lr, eps=eps, adam_learning_rate=lr, adam_b1=b1, adam_b2=b2,
                              weight_decay=0.0, adam_weight_decay=0.0,
                              muon_weight_dimension_numbers=muon_dimension_numbers(
                                  matrix_axes)))
    return optax.chain(*parts)
