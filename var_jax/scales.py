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


def leading_scales(patch_nums, num_tokens: int) -> tuple[int, ...]:
    """The leading scales of ``patch_nums`` whose tokens are exactly the first ``num_tokens``:
    under the block-causal mask such a prefix is a complete sequence of its own (what the coarse
    scales of a VAR see does not depend on the finer ones). Raises when ``num_tokens`` ends
    inside a scale."""
    layout = token_layout(patch_nums)
    ends = [end for _, end in layout.begin_ends]
    if num_tokens in ends:
        return layout.patch_nums[:ends.index(num_tokens) + 1]
    raise ValueError(f"expected a sequence of the leading scales of {layout.patch_nums}, i.e. "
                     f"one of {ends} tokens, found {num_tokens}")


def leading_group_end(begin_ends, group_tokens: int, *, include_first: bool = False) -> int:
    """The end of the leading scales that lie within the first ``group_tokens`` tokens (0 when
    not even the first does, or the first scale's end with ``include_first``): the attention
    backends do those scales as one masked product and every later scale as a product of its
    own."""
    end = begin_ends[0][1] if include_first else 0
    for _, e in begin_ends:
        if e <= group_tokens:
            end = e
    return end


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


@dataclasses.dataclass(frozen=True)
class ScaleBucket:
    """Consecutive scales that one compiled sampling step serves, each padded to the bucket's
    largest map: ``side`` x ``side`` tokens (``rows``), attending to the keys [0, ``read_len``)
    (the end of the bucket's last scale) with those beyond the scale's own end masked."""

    scales: tuple[int, ...]
    side: int
    read_len: int

    @property
    def rows(self) -> int:
        return self.side * self.side


def sampling_buckets(patch_nums, max_padding: float = 0.25) -> tuple[ScaleBucket, ...]:
    """Groups a schedule's scales into :class:`ScaleBucket` s for the bucketed sampler.

    Why: a compiled program pays code generation for every distinct shape it holds, and a
    sampler that runs each scale at its own shape compiles the transformer, the head and the
    draw ten times (d16); a bucket's scales share one step at one shape. The price is padded
    rows, so consecutive scales join a bucket greedily, coarse to fine, while the padded tokens
    of all buckets stay within ``max_padding`` x L (0.25 and the 256px schedule: the 1x1 ... 6x6
    maps in one bucket, 8x8 and 10x10 in a second, 13x13 and 16x16 alone; 161 padded tokens
    for L = 680). ``max_padding=0`` gives one bucket per scale.
    """
    layout = token_layout(patch_nums)
    if not (isinstance(max_padding, (int, float)) and 0 <= max_padding < float("inf")):
        raise ValueError(f"max_padding must be a finite number >= 0, got {max_padding!r}")
    budget = max_padding * layout.seq_len
    groups: list[list[int]] = []
    padded = 0  # padded tokens of the finished groups

    def padding(group):
        side = layout.patch_nums[group[-1]]
        return sum(side * side - layout.patch_nums[k] ** 2 for k in group)

    for k in range(layout.num_scales):
        if groups and padded + padding(groups[-1] + [k]) <= budget:
            groups[-1].append(k)
            continue
        if groups:
            padded += padding(groups[-1])
        groups.append([k])
    return tuple(ScaleBucket(tuple(g), layout.patch_nums[g[-1]], layout.begin_ends[g[-1]][1])
                 for g in groups)
