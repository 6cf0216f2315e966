"""The backend table: one source for names, options, defaults, validation, auto and decoding."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_helpers import LAYOUT, PATCH_NUMS, B, H, qkv, reference
from _repo import ROOT

from var_jax import attention
from var_jax.attention import registry

# A bad value for every option kind in the table (the check must name the option).
BAD = {"query_block": 0, "implementation": "fast", "group_tokens": -1, "degree": 2.5,
       "approximation": "pade", "center": "zero", "logit_bound": -1.0, "chunk": 0,
       "num_features": True, "orthogonal": 1, "eps": 0.0, "form": "dense"}


def test_names_come_from_the_table():
    assert attention.BACKENDS == attention.backend_names() == tuple(registry.BACKENDS)
    assert set(attention.BACKENDS) == {"exact", "flash", "poly", "favor", "auto"}
    # auto has no decoding state of its own; every other backend has one.
    assert attention.sampling_backend_names() == ("exact", "flash", "poly", "favor")
    assert attention.option_defaults("favor") == {"num_features": 256, "orthogonal": True,
                                                  "chunk": None, "group_tokens": 256}
    assert attention.option_defaults("auto") == {"eps": None}  # logit_bound is required


def test_no_script_or_config_writes_the_backend_list():
    """Flags take their choices from the table: a script listing the names itself would go
    stale when a backend is added (two did, missing "auto")."""
    names = "|".join(attention.BACKENDS)
    # Two or more backend names in one bracketed literal: a hand-written list of choices.
    listed = re.compile(rf'[\[(]\s*"({names})"\s*,\s*"({names})"')
    offenders = []
    for folder in ("scripts", "configs"):
        for path in sorted(pathlib.Path(ROOT, folder).glob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "DEFINE_enum" in line and listed.search(line):
                    offenders.append(f"{folder}/{path.name}:{number}: {line.strip()}")
    assert not offenders, "backend choices written by hand:\n" + "\n".join(offenders)


@pytest.mark.parametrize("backend", registry.backend_names())
def test_every_option_checked(backend):
    spec = registry.BACKENDS[backend]
    attention.check_backend_options(backend, spec.defaults, require=False)
    for opt in spec.options:
        with pytest.raises(ValueError, match=opt.name):
            attention.check_backend_options(backend, {opt.name: BAD[opt.name]}, require=False)
    with pytest.raises(ValueError, match="not understood"):
        attention.check_backend_options(backend, {"nonsense": 1})


def test_check_backend_options_messages():
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.check_backend_options("linear", {})
    with pytest.raises(ValueError, match="needs option logit_bound"):
        attention.check_backend_options("auto", {"eps": 1e-3})
    attention.check_backend_options("auto", {"eps": 1e-3}, require=False)  # bound given later
    attention.check_backend_options("auto", (("logit_bound", 2.0),))  # pairs, as in VARConfig
    with pytest.raises(ValueError, match="chebyshev"):
        attention.check_backend_options("poly", {"approximation": "chebyshev"})


def test_resolve_auto_is_plan():
    p = attention.plan(0.25, 2, LAYOUT.seq_len, 1 / LAYOUT.seq_len, patch_nums=PATCH_NUMS)
    assert p.backend == "poly"  # small bound and head dim: certified and cheaper
    assert attention.resolve_auto(0.25, 2, PATCH_NUMS) == (p.backend, p.options)
    wide = attention.plan(0.25, 8, LAYOUT.seq_len, 1e-3, patch_nums=PATCH_NUMS)
    assert attention.resolve_auto(0.25, 8, PATCH_NUMS, eps=1e-3) == ("flash", {})
    assert wide.backend == "flash"


@pytest.mark.parametrize("head_dim", [2, 8])  # plan picks poly at 2, flash at 8
def test_auto_decodes_as_its_resolved_backend(head_dim):
    q, k, v = qkv(seed=21, temperature=0.25, head_dim=head_dim)
    full = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="auto",
                                            logit_bound=0.25)
    name, _ = attention.resolve_auto(0.25, head_dim, PATCH_NUMS)
    state = attention.init_decode_state("auto", B, H, head_dim, PATCH_NUMS, logit_bound=0.25)
    assert state.backend == name and state.requested[0] == "auto"
    outs = []
    for scale, (begin, end) in enumerate(LAYOUT.begin_ends):
        sl = slice(begin, end)
        out, state = attention.decode_scale(state, q[:, sl], k[:, sl], v[:, sl], scale,
                                            backend="auto", logit_bound=0.25)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-6, rtol=1e-5)
    # The polynomial at this bound is certified to 1/L: close to the float64 reference.
    ref = reference(q, k, v)
    assert np.abs(np.asarray(full, np.float64) - ref).max() <= 2 / LAYOUT.seq_len
    with pytest.raises(ValueError, match="differs"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 0, backend="auto",
                               logit_bound=0.5)
    with pytest.raises(ValueError, match="does not match"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 0, backend="favor")


def test_explicit_defaults_equal_omitted_ones():
    q, k, v = qkv(seed=22, temperature=2.0)
    rng = jax.random.key(3)
    for backend in attention.sampling_backend_names():
        a = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend, rng=rng)
        b = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend, rng=rng,
                                             **attention.option_defaults(backend))
        np.testing.assert_array_equal(a, b)
        # A decoding state made without options accepts its defaults spelled out.
        state = attention.init_decode_state(backend, B, H, q.shape[-1], PATCH_NUMS, rng=rng)
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 0, backend=backend,
                               **attention.option_defaults(backend))
