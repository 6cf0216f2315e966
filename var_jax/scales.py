"""Scale schedules and the token layout of next-scale prediction.

A VAR image is a sequence of K square token maps of sides ``patch_nums`` (1x1 ... nxn), laid out
coarse to fine and row-major inside each map, L = sum(pn**2) tokens in all. Attention is
block-causal: a token sees every token of its own scale and of all coarser scales.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The schedules of the official release (utils/arg_util.py of FoundationVision/VAR).
SCHEDULES: dict[str, tuple[int, ...]] = {
    "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def geometric_schedule(n: int) -> tuple[int, ...]:
    """An increasing schedule of sides from 1 to ``n``, roughly geometric.

    For n = 16 and n = 32 this is the released 256px / 512px schedule, so benchmarks at those
    sides measure the models people use. Otherwise: ``3 log2(n) - 2`` points of the geometric grid
    ``n ** (k / (K - 1))``, rounded, duplicates dropped (n = 8 -> (1, 2, 3, 4, 6, 8); n = 64 ->
    14 scales, L = 9676; n = 256 -> 20 scales, L = 159889). L stays Theta(n^2) (about 2.4 n^2).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"geometric_schedule: n must be a positive int, got {n!r}")
    n = int(n)
    for schedule in (SCHEDULES["256"], SCHEDULES["512"]):
        if schedule[-1] == n:
            return schedule
    if n == 1:
        return (1,)
    num_points = max(2, round(3 * math.log2(n)) - 2)
    sides = {round(n ** (k / (num_points - 1))) for k in range(num_points)}
    return tuple(sorted(sides))


def validate_schedule(patch_nums) -> tuple[int, ...]:
    """Returns ``patch_nums`` as a tuple of ints, or raises ValueError saying what is wrong."""
    try:
        sides = tuple(int(p) for p in patch_nums)
    except (TypeError, ValueError) as err:
        raise ValueError(f"patch_nums must be a sequence of ints, got {patch_nums!r}") from err
    if not sides:
        raise ValueError("patch_nums must hold at least one scale, got an empty sequence")
    if any(p < 1 for p in sides):
        raise ValueError(f"patch_nums must be positive, got {sides}")
    if any(b <= a for a, b in zip(sides, sides[1:], strict=False)):
        raise ValueError(f"patch_nums must be strictly increasing, got {sides}")
    return sides


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each scale's tokens live in the flat sequence of L tokens."""

    patch_nums: tuple[int, ...]
    seq_len: int  # L
    begin_ends: list[tuple[int, int]]  # scale k occupies tokens [begin, end)
    level_ids: np.ndarray  # (L,) int32, the scale index of every token

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def block_causal_mask(self) -> np.ndarray:
        """(L, L) bool, True where query i may attend to key j (level(j) <= level(i))."""
        return self.level_ids[:, None] >= self.level_ids[None, :]


def token_layout(patch_nums) -> TokenLayout:
    sides = validate_schedule(patch_nums)
    begin_ends, begin = [], 0
    for p in sides:
        begin_ends.append((begin, begin + p * p))
        begin += p * p
    level_ids = np.concatenate([np.full(p * p, k, np.int32) for k, p in enumerate(sides)])
    return TokenLayout(sides, begin, begin_ends, level_ids)


def block_causal_mask(patch_nums) -> np.ndarray:
    """(L, L) bool mask of block-causal attention for a schedule."""
    return token_layout(patch_nums).block_causal_mask()


def phi_index_map(num_scales: int, num_phi: int = 4) -> tuple[int, ...]:
    """Which of the ``num_phi`` partially shared Phi convs each scale uses.

    The official code takes argmin |ticks - k/(K-1)| with ticks = linspace(1/(3m), 1-1/(3m), m)
    for m = 4; for K = 10 two scales sit exactly between two ticks and float rounding picks the
    higher index. The released schedules' maps are therefore hard-coded (as measured from the
    official code); other K use the same rule with ties broken upward, which reproduces them.
    """
    known = {(10, 4): (0, 0, 1, 1, 1, 2, 2, 3, 3, 3),
             (14, 4): (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)}
    if (num_scales, num_phi) in known:
        return known[(num_scales, num_phi)]
    if num_phi == 1:
        return (0,) * num_scales
    margin = 1 / (3 * num_phi) if num_phi == 4 else 1 / (2 * num_phi)
    ticks = np.linspace(margin, 1 - margin, num_phi)
    out = []
    for k in range(num_scales):
        at = k / (num_scales - 1) if num_scales > 1 else 1.0
        dist = np.abs(ticks - at)
        out.append(int(np.flatnonzero(dist <= dist.min() + 1e-12)[-1]))
    return tuple(out)
