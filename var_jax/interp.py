"""Area and bicubic resizing with PyTorch ``F.interpolate(align_corners=False)`` semantics.

The multi-scale quantizer moves features between scales with torch's ``mode="area"`` (adaptive
average pooling: output i averages input [floor(i s/d), ceil((i+1) s/d)), bins overlap when d does
not divide s, e.g. 16 -> 13) and ``mode="bicubic"`` (Keys kernel with A = -0.75, taps clamped at
the border). ``jax.image.resize`` is a different function (A = -0.5, renormalised edge weights,
antialiased linear instead of area) and changes the tokens, so it is not used.

Both torch ops are separable linear maps. They are built once per (src, dst, mode) as float64
numpy matrices from torch's formulas and applied as one einsum, which jits with the matrices as
constants and costs O(h w (H + W) C).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("area", "bicubic", "bilinear")
BICUBIC_A = -0.75  # torch's choice (upsample_bicubic2d), also OpenCV's


def _check_side(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"resize_matrix: {name} must be a positive int, got {value!r}")
    return int(value)


def _area_matrix(src: int, dst: int) -> np.ndarray:
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        # Integer arithmetic for the bin edges, as torch's start_index / end_index.
        start = (i * src) // dst
        end = -((-(i + 1) * src) // dst)
        out[i, start:end] = 1.0 / (end - start)
    return out


def _cubic_weights(t: float, a: float = BICUBIC_A) -> tuple[float, float, float, float]:
    """Keys' kernel at the four taps floor(x)-1 .. floor(x)+2 for the fraction t in [0, 1]."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _bicubic_matrix(src: int, dst: int) -> np.ndarray:
    out = np.zeros((dst, src), np.float64)
    scale = src / dst
    for i in range(dst):
        real = scale * (i + 0.5) - 0.5  # no clamp at 0 for cubic (torch: cubic=True)
        base = min(math.floor(real), src - 1)
        t = min(max(real - base, 0.0), 1.0)
        for tap, weight in enumerate(_cubic_weights(t)):
            out[i, min(max(base - 1 + tap, 0), src - 1)] += weight
    return out


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """Two taps at the half-pixel source coordinate, clamped at the borders (no antialias)."""
    out = np.zeros((dst, src), np.float64)
    for i in range(dst):
        real = max((i + 0.5) * src / dst - 0.5, 0.0)
        lo = min(int(np.floor(real)), src - 1)
        hi = min(lo + 1, src - 1)
        out[i, lo] += 1.0 - (real - lo)
        out[i, hi] += real - lo
    return out


@functools.cache
def _cached_matrix(src: int, dst: int, mode: str) -> np.ndarray:
    build = {"area": _area_matrix, "bicubic": _bicubic_matrix, "bilinear": _bilinear_matrix}[mode]
    matrix = build(src, dst)
    matrix.flags.writeable = False
    return matrix


def resize_matrix(src: int, dst: int, mode: str) -> np.ndarray:
    """The (dst, src) float64 matrix M with ``torch.interpolate(x, dst, mode) == M @ x`` (1-D).

    ``mode`` is ``"area"``, ``"bicubic"`` or ``"bilinear"`` (the last for editing masks and FID
    inputs, not the quantizer); ``align_corners=False`` and an explicit output size
    (no scale factor), as the VAR quantizer calls it. The array is cached and read-only.
    """
    src, dst = _check_side("src", src), _check_side("dst", dst)
    if mode not in MODES:
        raise ValueError(f"resize_matrix: mode must be one of {MODES}, got {mode!r}")
    return _cached_matrix(src, dst, mode)


def resize(x_BxHxWxC: jax.Array, size_hw: tuple[int, int], mode: str) -> jax.Array:
    """Resizes an NHWC batch to ``size_hw`` like ``F.interpolate(..., mode, align_corners=False)``.

    Returns ``x`` itself when the size is unchanged (torch is the identity there too), otherwise an
    array of x's dtype. Matrices are float64 numpy constants cast to x's dtype; the contraction
    runs at the highest matmul precision so accelerators do not drop to bf16 passes.
    """
    if getattr(x_BxHxWxC, "ndim", None) != 4:
        raise ValueError("resize: x must be (B, H, W, C), got shape "
                         f"{getattr(x_BxHxWxC, 'shape', type(x_BxHxWxC).__name__)}")
    try:
        out_h, out_w = (int(s) for s in size_hw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"resize: size_hw must be two ints (h, w), got {size_hw!r}") from err
    _, in_h, in_w, _ = x_BxHxWxC.shape
    if (out_h, out_w) == (in_h, in_w):
        return x_BxHxWxC
    dtype = x_BxHxWxC.dtype
    rows_hxH = jnp.asarray(resize_matrix(in_h, out_h, mode), dtype)
    cols_wxW = jnp.asarray(resize_matrix(in_w, out_w, mode), dtype)
    return jnp.einsum("hH,bHWc,wW->bhwc", rows_hxH, x_BxHxWxC, cols_wxW,
                      precision=jax.lax.Precision.HIGHEST)
