"""The attention backends as one table: each backend's options, full call and decoding step.

`BACKENDS` maps a name to a `Backend`: its `Option`s (name, default, value check), the full
block-causal call, and, for backends that sample, the decoding-state init and per-scale step.
`block_causal_attention`, `init_decode_state` / `decode_scale`, `check_backend_options` (what a
model config calls) and the scripts all read this table, so adding a backend or an option is one
edit here.

Two families share their implementation: exact / flash keep a KV cache (B, L, H, D) and differ in
the kernel of one scale's prefix call; poly / favor are low-rank feature maps over the prefix-sum
core and differ in the map. "auto" has no kernel of its own: it resolves to ("poly" or "flash",
options) through `criterion.plan` and then runs that backend (also when decoding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from var_jax import scales
from var_jax.attention import _checks, criterion, exact, favor, flash, poly, prefix

REQUIRED = object()  # default of an option the caller must give


# Value checks: each raises ValueError naming the option.
_positive_int = _checks.check_positive_int
_positive_number = _checks.check_positive_number


def _positive_int_or_none(name, value):
    if value is not None:
        _positive_int(name, value)


def _non_negative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _positive_number_or_none(name, value):
    if value is not None:
        _positive_number(name, value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")


def _boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _one_of(*choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    check.value_type = str
    return check


# The type of value each check accepts (what a config file declares for the option).
for _check, _type in ((_positive_int, int), (_positive_int_or_none, int), (_non_negative_int, int),
                      (_positive_number, float), (_positive_number_or_none, float),
                      (_real, float), (_boolean, bool)):
    _check.value_type = _type


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    check: Callable[[str, Any], None]
    doc: str

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def value_type(self) -> type:
        return self.check.value_type


CHUNK = Option("chunk", None, _positive_int_or_none,
               "tokens whose features exist at once (None: a memory budget per platform)")
GROUP_TOKENS = Option("group_tokens", prefix.DEFAULT_GROUP_TOKENS, _non_negative_int,
                      "leading scales within this many tokens are done as one masked product")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One attention backend.

    full(q, k, v, layout, rng, opts) -> out (B, L, H, D) in q's dtype.
    init(batch, heads, head_dim, seq_len, dtype, rng, opts) -> dict of state arrays.
    step(arrays, q, k, v, begin, end, opts) -> (out (B, l, H, D) in q's dtype, new arrays).
    resolve(head_dim, layout, opts) -> (backend name, opts) for a backend that delegates.
    ``opts`` is always the complete option dict (defaults filled in, checked).
    kv_cache: the state is a KV cache {"k", "v"} of (B, L, H, D) whose step writes [begin, end)
    and reads [0, end) only, so a caller may hand it the cache cut at ``end`` (what the scanned
    sampler does to read one layer's cache in place of copying all of it).
    step_rows(arrays, q, k, v, begin, end, opts) (KV-cache backends): the step for a scale
    padded to q's l >= end - begin rows, with ``begin`` and ``end`` traced ints: writes the l
    rows at ``begin`` (the cache must hold them) and reads the keys [0, end) of the cache it is
    given, whatever its length (the bucketed sampler's step, ``scales.sampling_buckets``).
    """

    name: str
    options: tuple[Option, ...]
    full: Callable
    init: Callable | None = None
    step: Callable | None = None
    resolve: Callable | None = None
    doc: str = ""
    kv_cache: bool = False
    step_rows: Callable | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options if not o.required}


# --- exact / flash: KV cache --------------------------------------------------------------------

def _kv_init(batch, heads, head_dim, seq_len, dtype, rng, opts):
    del rng, opts
    cache = jnp.zeros((batch, seq_len, heads, head_dim), dtype)
    return {"k": cache, "v": cache}


def _kv_step(attend_prefix):
    """Step of a KV-cache backend whose one-scale kernel is attend_prefix(q, k, v, opts)."""
    def step(arrays, q, k, v, begin, end, opts):
        cache_k = arrays["k"].at[:, begin:end].set(k.astype(arrays["k"].dtype))
        cache_v = arrays["v"].at[:, begin:end].set(v.astype(arrays["v"].dtype))
        out = attend_prefix(q, cache_k[:, :end], cache_v[:, :end], opts)
        return out.astype(q.dtype), {"k": cache_k, "v": cache_v}
    return step


def _kv_step_rows(attend_prefix):
    """Step of a KV-cache backend on padded rows at a traced offset (``Backend.step_rows``);
    attend_prefix(q, k, v, opts, kv_len) attends to the first kv_len keys."""
    def step_rows(arrays, q, k, v, begin, end, opts):
        at = (0, begin, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(arrays["k"], k.astype(arrays["k"].dtype), at)
        cache_v = jax.lax.dynamic_update_slice(arrays["v"], v.astype(arrays["v"].dtype), at)
        out = attend_prefix(q, cache_k, cache_v, opts, end)
        return out.astype(q.dtype), {"k": cache_k, "v": cache_v}
    return step_rows


def _exact_full(q, k, v, layout, rng, opts):
    del rng
    return exact.exact_attention(q, k, v, layout.patch_nums, **opts)


def _flash_full(q, k, v, layout, rng, opts):
    del rng
    return flash.flash_attention(q, k, v, layout.patch_nums, **opts)


def _exact_prefix(q, k, v, opts, kv_len=None):
    del opts
    return exact.attend_prefix(q, k, v, kv_len)


def _flash_prefix(q, k, v, opts, kv_len=None):
    return flash.prefix_call(q, k.astype(q.dtype), v.astype(q.dtype), opts["implementation"],
                             kv_len)


# --- poly / favor: low-rank feature maps over the prefix-sum core -------------------------------

def _poly_full(features_full):
    """poly's full call: the features form, or the kernel form (the same function, O(L^2))."""
    def full(q, k, v, layout, rng, opts):
        if opts["form"] == "features":
            return features_full(q, k, v, layout, rng, opts)
        coeffs = poly.exp_poly_coefficients(opts["degree"], opts["approximation"],
                                            center=opts["center"],
                                            logit_bound=opts["logit_bound"])
        return poly.kernel_attention(q, k, v, layout.patch_nums, coeffs)
    return full


def _poly_map(head_dim, opts, arrays):
    del arrays
    return poly.feature_map(head_dim, degree=opts["degree"], approximation=opts["approximation"],
                            center=opts["center"], logit_bound=opts["logit_bound"])


def _favor_map(head_dim, opts, arrays):
    del head_dim, opts
    return favor.feature_map(arrays["projection"])


def _favor_draw(head_dim, rng, opts):
    return {"projection": favor.draw_projection(rng, opts["num_features"], head_dim,
                                                orthogonal=opts["orthogonal"])}


def _no_draw(head_dim, rng, opts):
    del head_dim, rng, opts
    return {}


def _feature_map(make_map, head_dim, dtype, opts, arrays):
    fmap = make_map(head_dim, opts, arrays)
    return fmap._replace(precision=prefix.precision_for(dtype))


def _chunk(opts, batch, heads, num_features):
    if opts["chunk"] is not None:
        return opts["chunk"]
    return prefix.default_chunk(batch, heads, num_features)


def _low_rank(make_map, draw):
    """(full, init, step) of a low-rank backend: make_map(head_dim, opts, arrays) -> FeatureMap;
    draw(head_dim, rng, opts) -> the arrays the map needs (favor's projection), drawn once."""

    def full(q, k, v, layout, rng, opts):
        batch, _, heads, head_dim = q.shape
        arrays = draw(head_dim, rng, opts)
        fmap = _feature_map(make_map, head_dim, q.dtype, opts, arrays)
        out = prefix.full_attention(fmap, q, k, v, layout.begin_ends,
                                    _chunk(opts, batch, heads, fmap.num_features),
                                    opts["group_tokens"])
        return out.astype(q.dtype)

    def init(batch, heads, head_dim, seq_len, dtype, rng, opts):
        del seq_len, dtype
        arrays = draw(head_dim, rng, opts)
        fmap = make_map(head_dim, opts, arrays)
        return dict(arrays, sums=prefix.init_sums(batch, heads, fmap.num_features, head_dim))

    def step(arrays, q, k, v, begin, end, opts):
        del begin, end
        fmap = _feature_map(make_map, q.shape[-1], q.dtype, opts, arrays)
        batch, heads = arrays["sums"].c_BxH.shape
        chunk = _chunk(opts, batch, heads, fmap.num_features)
        sums = prefix.absorb(fmap, arrays["sums"], k, v, chunk)
        out = prefix.read(fmap, sums, q, chunk)
        return out.astype(q.dtype), dict(arrays, sums=sums)

    return full, init, step


# --- auto: the certified choice of plan ---------------------------------------------------------

def resolve_auto(logit_bound, head_dim, patch_nums, eps=None):
    """(backend, options) that "auto" runs: `plan` at eps (default 1 / L) for this schedule."""
    layout = scales.token_layout(patch_nums)
    eps = 1.0 / layout.seq_len if eps is None else eps
    chosen = criterion.plan(logit_bound, head_dim, layout.seq_len, eps,
                            patch_nums=layout.patch_nums)
    return chosen.backend, chosen.options


def _auto_resolve(head_dim, layout, opts):
    return resolve_auto(opts["logit_bound"], head_dim, layout.patch_nums, opts["eps"])


def _auto_full(q, k, v, layout, rng, opts):
    name, chosen = _auto_resolve(q.shape[-1], layout, opts)
    backend = BACKENDS[name]
    return backend.full(q, k, v, layout, rng, complete_options(name, chosen))


def _make_table():
    poly_full, poly_init, poly_step = _low_rank(_poly_map, _no_draw)
    favor_full, favor_init, favor_step = _low_rank(_favor_map, _favor_draw)
    table = (
        Backend("exact", (
            Option("query_block", None, _positive_int_or_none,
                   "queries per lax.map block (None: by a logit-memory budget)"),
            Option("group_tokens", exact.DEFAULT_GROUP_TOKENS, _non_negative_int,
                   "leading scales within this many tokens are one masked product, every "
                   "later scale an unmasked one against its prefix")),
            _exact_full, _kv_init, _kv_step(_exact_prefix),
            doc="float32 masked reference, O(L^2)", kv_cache=True,
            step_rows=_kv_step_rows(_exact_prefix)),
        Backend("flash", (
            Option("implementation", "default", _one_of("default", None, "xla", "cudnn"),
                   "jax.nn.dot_product_attention implementation ('default': cuDNN for half "
                   "precision on GPU)"),
            GROUP_TOKENS), _flash_full, _kv_init, _kv_step(_flash_prefix),
            doc="exact, one unmasked fused call per scale", kv_cache=True,
            step_rows=_kv_step_rows(_flash_prefix)),
        Backend("poly", (
            Option("degree", 2, _non_negative_int, "polynomial degree g (rank binom(D+g, g))"),
            Option("approximation", "taylor", _one_of(*poly.APPROXIMATIONS),
                   "polynomial of exp"),
            Option("center", 0.0, _real, "Taylor centre (plan picks 0 or -b)"),
            Option("logit_bound", None, _positive_number_or_none,
                   "bound b of the logits (needed by chebyshev)"),
            Option("form", "features", _one_of(*poly.FORMS),
                   "full call as low-rank features (O(L M D)) or as the polynomial kernel on "
                   "the L x L logits (O(L^2 D), the same function; decoding uses features)"),
            CHUNK, GROUP_TOKENS), _poly_full(poly_full), poly_init, poly_step,
            doc="polynomial method (Alman-Song), certified by plan"),
        Backend("favor", (
            Option("num_features", 256, _positive_int, "random features M"),
            Option("orthogonal", True, _boolean, "orthogonal blocks of Gaussian rows"),
            CHUNK, GROUP_TOKENS), favor_full, favor_init, favor_step,
            doc="FAVOR+ positive random features (needs rng)"),
        Backend("auto", (
            Option("logit_bound", REQUIRED, _positive_number, "bound b of |q . k|"),
            Option("eps", None, _positive_number_or_none,
                   "target entry error (None: 1 / L)")),
            _auto_full, resolve=_auto_resolve, doc="plan's choice of poly or flash"),
    )
    return {b.name: b for b in table}


BACKENDS: Mapping[str, Backend] = _make_table()


def option_types() -> dict[str, type]:
    """Every option name of every backend -> the type of its values (for config schemas)."""
    return {opt.name: opt.value_type for backend in BACKENDS.values() for opt in backend.options}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def sampling_backend_names() -> tuple[str, ...]:
    """Backends with a decoding state of their own (auto decodes as the backend it resolves to)."""
    return tuple(n for n, b in BACKENDS.items() if b.init is not None)


def get(backend) -> Backend:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
    return BACKENDS[backend]


def check_backend_options(backend, options, *, require=True) -> None:
    """Raises ValueError naming an unknown backend, an unknown option, a bad value or (with
    ``require``) a missing required option. ``options``: a mapping or (name, value) pairs."""
    spec = get(backend)
    options = dict(options)
    unknown = sorted(set(options) - set(spec.option_names))
    if unknown:
        raise ValueError(f"options {unknown} are not understood by backend {backend!r}; "
                         f"it takes {list(spec.option_names)}")
    for opt in spec.options:
        if opt.name in options:
            opt.check(opt.name, options[opt.name])
        elif require and opt.required:
            raise ValueError(f"backend {backend!r} needs option {opt.name} ({opt.doc}); got "
                             f"{sorted(options)}")
    if (backend == "poly" and options.get("approximation") == "chebyshev"
            and options.get("logit_bound") is None):
        raise ValueError("logit_bound must be a positive number for the chebyshev "
                         "approximation of poly, got None")


def complete_options(backend, options) -> dict:
    """Checked options with every default filled in."""
    check_backend_options(backend, options)
    return dict(get(backend).defaults, **dict(options))


def full_attention(q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, *, backend="exact", rng=None, **options):
    """Plain (unmasked) softmax attention of N queries over N keys with a registered backend.

    One scale of the decoder with an empty state: exact / flash attend to the whole cache, poly /
    favor absorb every key and read every query, so each backend's own approximation applies.
    "auto" asks `plan` with seq_len = N and no schedule (exact cost counted as N^2 / 2 pairs,
    which errs toward exact). Used by the VQ-VAE's mid-block attention over all n^2 positions.
    """
    batch, seq_len, heads, head_dim = q_BxNxHxD.shape
    if k_BxNxHxD.shape != q_BxNxHxD.shape or v_BxNxHxD.shape[:3] != q_BxNxHxD.shape[:3]:
        raise ValueError(f"q, k, v must be (B, N, H, D) with equal (B, N, H) and q, k in D, got "
                         f"{q_BxNxHxD.shape}, {k_BxNxHxD.shape}, {v_BxNxHxD.shape}")
    opts = complete_options(backend, options)
    if backend == "auto":
        eps = 1.0 / seq_len if opts["eps"] is None else opts["eps"]
        chosen = criterion.plan(opts["logit_bound"], head_dim, seq_len, eps)
        backend, opts = chosen.backend, complete_options(chosen.backend, chosen.options)
    spec = get(backend)
    arrays = spec.init(batch, heads, head_dim, seq_len, k_BxNxHxD.dtype, rng, opts)
    out, _ = spec.step(arrays, q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, 0, seq_len, opts)
    return out
