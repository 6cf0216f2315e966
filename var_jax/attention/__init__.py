"""Block-causal attention for next-scale prediction: exact, fused, polynomial and random-feature.

Every backend computes the same function: for q, k, v of shape (B, L, H, D) laid out by a
schedule ``patch_nums``, softmax(q . k) v where a token attends to its own scale and all coarser
scales (logits are q . k: the caller scales and normalises). The low-rank backends ("poly", the
polynomial method of the VAR complexity paper, and "favor", FAVOR+ random features) run in
O(L x rank x D) time through per-scale running sums, which double as an O(rank x D) decoding
state. ``plan`` says when the polynomial method is certified and cheaper; "auto" follows it.

The backends, their options and defaults live in one table, `registry.BACKENDS`; the functions
here, `check_backend_options` (for model configs) and the scripts read it.

Modules: registry (the table), exact (masked float32 reference, query blocks), flash (per-scale
unmasked fused calls), poly and favor (feature maps), prefix (the running-sum core), decode
(sampling state), criterion (plan).
"""

from __future__ import annotations

from var_jax.attention import _checks, criterion, decode, exact, flash, prefix, registry  # noqa: F401
from var_jax.attention.criterion import Plan, plan
from var_jax.attention.decode import (
    DecodeState,
    PaddedScale,
    decode_rows,
    decode_scale,
    init_decode_state,
)
from var_jax.attention.registry import (
    backend_names,
    check_backend_options,
    full_attention,
    resolve_auto,
    sampling_backend_names,
)

__all__ = ["block_causal_attention", "plan", "Plan", "init_decode_state", "decode_scale",
           "decode_rows", "PaddedScale", "DecodeState", "BACKENDS", "backend_names",
           "sampling_backend_names", "check_backend_options", "resolve_auto", "full_attention",
           "option_defaults"]

BACKENDS = backend_names()


def option_defaults(backend) -> dict:
    """{option name: default} of ``backend`` (required options, such as auto's logit_bound,
    have no default and are left out)."""
    return registry.get(backend).defaults


def block_causal_attention(q, k, v, patch_nums, *, backend="exact", rng=None, **options):
    """Block-causal softmax attention; q, k, v (B, L, H, D); returns (B, L, H, D) in q's dtype.

    Options (names, defaults and checks in `registry.BACKENDS`): exact ``query_block``; flash
    ``implementation`` ("default": cuDNN for half precision on GPU, None, "xla", "cudnn"),
    ``group_tokens``; poly ``degree`` (2), ``approximation`` ("taylor" | "chebyshev"),
    ``center``, ``logit_bound``; favor ``num_features`` (256), ``orthogonal`` (True) and an
    ``rng`` key (features are drawn per call); both also take ``chunk`` (tokens whose features
    exist at once) and ``group_tokens`` (leading scales done as one masked product); auto
    ``logit_bound`` (required) and ``eps`` (1 / L), resolved by `resolve_auto` (`plan`).
    """
    spec = registry.get(backend)
    layout = _checks.check_qkv(q, k, v, patch_nums)
    return spec.full(q, k, v, layout, rng, registry.complete_options(backend, options))
