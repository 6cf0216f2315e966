"""interp: resize matrices against an independent float64 reading of torch's formulas, and torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import interp, scales


def _schedule_pairs():
    """(src, dst, mode) for every resize the official quantizer does at 256/512/1024 px."""
    pairs = set()
    for schedule in scales.SCHEDULES.values():
        side = schedule[-1]
        for pn in schedule:
            pairs.add((side, pn, "area"))  # down: residual -> scale
            pairs.add((pn, side, "bicubic"))  # up: codes -> latent side
    return sorted(pairs)


PAIRS = _schedule_pairs()


def _reference_area(src, dst):
    # Bins as real intervals [i s/d, (i+1) s/d) widened to whole pixels (adaptive avg pooling).
    out = np.zeros((dst, src))
    for i in range(dst):
        lo, hi = math.floor(i * src / dst), math.ceil((i + 1) * src / dst)
        out[i, lo:hi] = 1.0 / (hi - lo)
    return out


def _keys_kernel(x, a=-0.75):
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _reference_bicubic(src, dst):
    # Kernel evaluated at the distance to each of the 4 taps around the half-pixel source
    # coordinate; taps outside the image read the border pixel.
    out = np.zeros((dst, src))
    centre = (np.arange(dst) + 0.5) * src / dst - 0.5
    for offset in (-1, 0, 1, 2):
        taps = np.floor(centre) + offset
        np.add.at(out, (np.arange(dst), np.clip(taps, 0, src - 1).astype(int)),
                  _keys_kernel(centre - taps))
    return out


def test_schedule_pairs_match_reference_formulas():
    assert len(PAIRS) > 40
    for src, dst, mode in PAIRS:
        ref = _reference_area(src, dst) if mode == "area" else _reference_bicubic(src, dst)
        got = interp.resize_matrix(src, dst, mode)
        assert got.shape == (dst, src) and got.dtype == np.float64
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12, err_msg=f"{src}->{dst} {mode}")
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)  # both preserve constants


def test_known_weights_and_overlapping_bins():
    area = interp.resize_matrix(16, 13, "area")
    np.testing.assert_allclose(area[0, :2], [0.5, 0.5])
    # 16 -> 13: some input pixels belong to two bins.
    assert (np.count_nonzero(area, axis=0) == 2).any()
    np.testing.assert_allclose(interp.resize_matrix(3, 16, "bicubic")[0],
                               [1.107414245605469, -0.107414245605469, 0.0], atol=1e-9)
    np.testing.assert_array_equal(interp.resize_matrix(7, 7, "bicubic"), np.eye(7))
    np.testing.assert_array_equal(interp.resize_matrix(7, 7, "area"), np.eye(7))


def test_matrices_are_cached_and_read_only():
    m = interp.resize_matrix(16, 5, "area")
    assert m is interp.resize_matrix(16, 5, "area")
    with pytest.raises(ValueError):
        m[0, 0] = 1.0


@pytest.mark.torch
def test_schedule_pairs_match_torch():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    for src, dst, mode in PAIRS + [(16, 13, "bicubic"), (13, 16, "area"), (5, 11, "bicubic")]:
        # Push the identity basis through torch (float64): column j of the matrix is the
        # resized j-th unit vector. Width 1 -> 1 is the identity in both modes.
        basis = torch.eye(src, dtype=torch.float64).reshape(src, 1, src, 1)
        kwargs = {} if mode == "area" else {"align_corners": False}
        out = functional.interpolate(basis, size=(dst, 1), mode=mode, **kwargs)
        np.testing.assert_allclose(interp.resize_matrix(src, dst, mode),
                                   out[:, 0, :, 0].numpy().T, rtol=0, atol=1e-12,
                                   err_msg=f"{src}->{dst} {mode}")


@pytest.mark.torch
@pytest.mark.parametrize("mode,src_hw,dst_hw", [("area", (16, 16), (13, 13)),
                                                ("bicubic", (3, 5), (16, 12)),
                                                ("area", (9, 6), (4, 5))])
def test_resize_2d_matches_torch(mode, src_hw, dst_hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, *src_hw, 3)).astype(np.float32)
    kwargs = {} if mode == "area" else {"align_corners": False}
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                           size=dst_hw, mode=mode, **kwargs)
    got = jax.jit(lambda v: interp.resize(v, dst_hw, mode))(x)
    assert got.dtype == jnp.float32 and got.shape == (2, *dst_hw, 3)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_resize_is_separable_matrix_product_and_identity():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 2)), jnp.float32)
    assert interp.resize(x, (6, 6), "bicubic") is x
    m = interp.resize_matrix(6, 4, "area")
    want = np.einsum("hH,bHWc,wW->bhwc", m, np.asarray(x, np.float64), m)
    np.testing.assert_allclose(np.asarray(interp.resize(x, (4, 4), "area")), want, atol=1e-6)
    assert interp.resize(x.astype(jnp.bfloat16), (4, 4), "area").dtype == jnp.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        interp.resize_matrix(4, 2, "nearest")
    with pytest.raises(ValueError, match="src"):
        interp.resize_matrix(0, 2, "area")
    with pytest.raises(ValueError, match="dst"):
        interp.resize_matrix(4, 2.5, "area")
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        interp.resize(jnp.zeros((4, 4, 3)), (2, 2), "area")
    with pytest.raises(ValueError, match="size_hw"):
        interp.resize(jnp.zeros((1, 4, 4, 3)), 2, "area")
