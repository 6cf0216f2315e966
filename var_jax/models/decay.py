"""Which parameters get weight decay: one rule, by parameter name, for every model and layout;
and the path helpers the other parameter rules share (names along a path, the stacked layer axis).

The official VAR decays the weight matrices of its Linear layers and its class embedding, and
not biases, norms, positional and level embeddings, the per-head temperatures or the shared
AdaLN table. Deciding by name (not by ``ndim >= 2``, the official test) keeps the rule right
when the blocks are stacked along a layer axis, where a bias of shape (depth, C) is 2-D. The
tokenizer follows the same rule (conv kernels and the codebook decay, norms and biases don't).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

# Weight matrices (decayed unless a name below is on their path).
DECAYED_LEAVES = ("kernel", "qkv_kernel", "embedding")
# Never decayed, wherever they appear on a parameter's path (the official no-decay names).
NO_DECAY_NAMES = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss", "bias")


def decays(path) -> bool:
    """The rule for one parameter path (a tuple of names / indices)."""
    names = [str(p) for p in path]
    if names and names[-1] == "value":  # the Variable's own field, not a parameter name
        names = names[:-1]
    return bool(names) and names[-1] in DECAYED_LEAVES and not any(
        name in NO_DECAY_NAMES for name in names)


def _entry_name(entry):
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def path_names(path) -> tuple:
    """The names / layer indices along a pytree path of a Param state (jax key entries), without
    the Variable's own trailing "value" field."""
    names = tuple(_entry_name(p) for p in path)
    return names[:-1] if names and names[-1] == "value" else names


# Path entries under which parameters are stacked along a leading layer axis (scan over layers):
# ('blocks', 'attn', 'qkv_kernel') of shape (depth, ...). The looped layout ('blocks', 0, ...)
# has an integer right after it and no stacking axis.
STACKED_COLLECTIONS = ("blocks",)


def stacked_layer_axis(path) -> bool:
    """Whether axis 0 of the leaf at `path` (jax key entries) is a stacking (layer) axis: the
    path passes through a stacked collection and the entry after it is a name, not a layer
    index. Read by the sharding rules (never split that axis) and Muon's matrix axes."""
    names = path_names(path)
    for i, name in enumerate(names[:-1]):
        if name in STACKED_COLLECTIONS and not isinstance(names[i + 1], (int, np.integer)):
            return True
    return False


def weight_decay_mask(model_or_state):
    """A pytree of bools shaped like ``nnx.as_pure(nnx.state(model, nnx.Param))``: True where
    decayed. Takes a model, its Param state, or a params pytree of arrays; so both
    ``optax.adamw(..., mask=weight_decay_mask(model))`` and ``mask=weight_decay_mask`` (called
    by optax on the params) work with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
    """
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    state = nnx.as_pure(state)  # plain arrays, the structure optax sees inside nnx.Optimizer
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(path_names(path)), state)
