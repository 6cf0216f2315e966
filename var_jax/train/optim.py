"""Optimizer pieces of the official VAR recipe: the 'lin0' schedule, the weight-decay cosine and
the decay / no-decay parameter groups, as optax transformations.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

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
