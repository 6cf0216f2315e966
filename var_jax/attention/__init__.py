"""Block-causal attention for next-scale prediction: exact, fused, polynomial and random-feature.

Every backend computes the same function: for q, k, v of shape (B, L, H, D) laid out by a
schedule ``patch_nums``, softmax(q . k) v where a token attends to its own scale and all coarser
scales (logits are q . k: the caller scales and normalises). The low-rank backends ("poly", the
polynomial method of the VAR complexity paper, and "favor", FAVOR+ random features) run in
O(L x rank x D) time through per-scale running sums, which double as an O(rank x D) decoding
state. ``plan`` says when the polynomial method is certified and cheaper; "auto" follows it.

Modules: exact (masked float32 reference, query blocks), flash (per-scale unmasked fused calls),
poly and favor (feature maps), prefix (the running-sum core), decode (sampling state),
criterion (plan).
"""

from __future__ import annotations

from var_jax.attention import _checks, criterion, decode, exact, flash, prefix  # noqa: F401
from var_jax.attention.criterion import Plan, plan
from var_jax.attention.decode import DecodeState, decode_scale, init_decode_state

__all__ = ["block_causal_attention", "plan", "Plan", "init_decode_state", "decode_scale",
           "DecodeState", "BACKENDS"]

BACKENDS = _checks.BACKENDS


def block_causal_attention(q, k, v, patch_nums, *, backend="exact", rng=None, **options):
    """Block-causal softmax attention; q, k, v (B, L, H, D); returns (B, L, H, D) in q's dtype.

    Options: exact ``query_block``; flash ``implementation`` (None, "xla", "cudnn"; default cuDNN
    for half precision on GPU), ``group_tokens``; poly ``degree`` (2), ``approximation``
    ("taylor" | "chebyshev"), ``center``, ``logit_bound``; favor ``num_features`` (256),
    ``orthogonal`` (True) and an ``rng`` key (features are drawn per call); both also take
    ``chunk`` (tokens whose features exist at once) and ``group_tokens`` (leading scales done as
    one masked product); auto ``logit_bound`` (required) and ``eps`` (1 / L), resolved by
    `plan` (whose ``.options`` are passed on).
    """
    backend = _checks.check_backend(backend)
    layout = _checks.check_qkv(q, k, v, patch_nums)
    if backend == "auto":
        unknown = sorted(set(options) - {"logit_bound", "eps"})
        if unknown or "logit_bound" not in options:
            raise ValueError(f"backend 'auto' takes options logit_bound (required) and eps, got "
                             f"{sorted(options)}")
        chosen = plan(options["logit_bound"], q.shape[-1], layout.seq_len,
                      options.get("eps", 1.0 / layout.seq_len), patch_nums=layout.patch_nums)
        return block_causal_attention(q, k, v, layout.patch_nums, backend=chosen.backend,
                                      rng=rng, **chosen.options)
    decode.check_options(backend, options)
    if backend == "exact":
        return exact.exact_attention(q, k, v, layout.patch_nums, **options)
    if backend == "flash":
        return flash.flash_attention(q, k, v, layout.patch_nums, **options)
    batch, _, num_heads, head_dim = q.shape
    state = init_decode_state(backend, batch, num_heads, head_dim, layout.patch_nums, rng=rng,
                              **options)
    fmap, chunk = decode.low_rank_map(backend, head_dim, state.options,
                                      state.arrays.get("projection"))
    fmap = fmap._replace(precision=prefix.precision_for(q.dtype))
    if chunk is None:
        chunk = prefix.default_chunk(batch, num_heads, fmap.num_features)
    out = prefix.full_attention(fmap, q, k, v, layout.begin_ends, chunk,
                                options.get("group_tokens", prefix.DEFAULT_GROUP_TOKENS))
    return out.astype(q.dtype)


