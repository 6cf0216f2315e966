"""The generic train step: state pytree in, state pytree and metrics out, one jitted function.

The train state is a plain dict pytree so that Orbax, jit shardings and donation all see the
same thing: {"step", "params" (nnx.Param state), "extra" (every other model variable, e.g.
codebook usage counters), "opt_state", "rng" (raw key data)}. A recipe supplies the loss; the
step supplies gradients, the optimizer, a global-norm metric and the non-finite guard: when the
loss or the gradient norm is not finite the update is dropped (the state keeps its last good
values) and `finite` is 0 in the metrics, so the loop can stop without saving a broken state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def split_model(model: nnx.Module):
    """(graphdef, params, extra): extra is every non-parameter variable."""
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef, state: dict) -> nnx.Module:
    return nnx.merge(graphdef, state["params"], state["extra"])


def init_state(create_model: Callable[[jax.Array], nnx.Module],
               tx: optax.GradientTransformation, key: jax.Array):
    """Returns (graphdef, state) for a model built from `key`."""
    model = create_model(key)
    graphdef, params, extra = split_model(model)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "extra": extra,
             "opt_state": tx.init(params),
             "rng": jax.random.key_data(jax.random.fold_in(key, 1))}
    return graphdef, state


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation,
                    lr_fn: Callable, post_update: Callable | None = None):
    """Builds `train_step(state, frozen, batch, stop) -> (state, metrics)` (not yet jitted).

    stop (one int32 per device, split like the batch) carries each process's "stop requested"
    (SIGTERM); its max over every device comes back as metrics["stop"], so all processes learn
    the same answer for the same step with no extra host synchronisation.

    loss_fn(model, frozen, batch, key) -> (scalar loss, metrics dict); it may update
    non-parameter variables of `model`; metrics whose name starts with "_" (and "_step", the
    step number) reach post_update but are not returned.
    post_update(model, frozen, metrics, key) -> metrics runs after the optimizer update (e.g.
    dead-code re-seeding) and may edit the model.
    """

    def train_step(state: dict, frozen: Any, batch: dict, stop: jax.Array):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        k_loss, k_post = jax.random.split(key)

        def objective(params):
            model = nnx.merge(graphdef, params, state["extra"], copy=True)
            loss, metrics = loss_fn(model, frozen, batch, k_loss)
            _, _, extra = split_model(model)
            return loss, (metrics, extra)

        (loss, (metrics, extra)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, _step=step)
        if post_update is not None:
            model = nnx.merge(graphdef, params, extra, copy=True)
            metrics.update(post_update(model, frozen, metrics, k_post))
            _, params, extra = split_model(model)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = {"step": step + 1, "params": params, "extra": extra, "opt_state": opt_state,
               "rng": state["rng"]}
        old = dict(state, step=step + 1)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        # Keys starting with "_" are private to the recipe (e.g. encoder outputs for re-seeding).
        metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}
        metrics.update(loss=loss, grad_norm=grad_norm, lr=lr_fn(step),
                       finite=finite.astype(jnp.float32), stop=jnp.max(stop))
        return new, metrics

    return train_step
