"""Input validation shared by the attention backends (errors a caller can cause, raised early)."""

from __future__ import annotations

from var_jax import checks, scales


def check_qkv(q, k, v, patch_nums):
    """Checks shapes (B, L, H, D) and that L is the schedule's token count; returns the layout."""
    layout = scales.token_layout(patch_nums)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape (B, L, H, D), got shape "
                             f"{getattr(x, 'shape', None)}")
    if q.shape != k.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, L, H, Dv) = {q.shape[:3]} + (Dv,), got {v.shape}")
    if q.shape[1] != layout.seq_len:
        raise ValueError(f"q, k, v: L must equal the token count {layout.seq_len} of patch_nums "
                         f"{layout.patch_nums}, got L = {q.shape[1]}")
    return layout


def check_scale_qkv(q, k, v, patch_nums, scale_index):
    """Checks one scale's q, k, v of shape (B, pn**2, H, D) in decoding."""
    sides = scales.validate_schedule(patch_nums)
    if not isinstance(scale_index, int) or not 0 <= scale_index < len(sides):
        raise ValueError(f"scale_index must be a Python int in [0, {len(sides)}), "
                         f"got {scale_index!r}")
    tokens = sides[scale_index] ** 2
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4 or x.shape[1] != tokens:
            raise ValueError(f"{name} must have shape (B, {tokens}, H, D) at scale {scale_index}, "
                             f"got {getattr(x, 'shape', None)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must agree in (B, l, H) and q, k in D; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    return sides


# The project's one checker (same rule and wording everywhere).
check_positive_int = checks.positive_int
check_positive_number = checks.positive_number
