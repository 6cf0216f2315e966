"""The VAR transformer (next-scale prediction), the official architecture in Flax NNX.

Why it looks the way it does: the parameters must load the official checkpoints one to one, so the
module tree mirrors the official names (``blocks[i].attn.proj`` <- ``blocks.i.attn.proj``) and
fused torch tensors keep their layout up to a reshape (``mat_qkv`` (3C, C) becomes a kernel
(C, 3, H, D), each ``ada_lin`` (6C, C) a kernel (C, 6, C) whose middle axis is the official chunk
order [gamma1, gamma2, scale1, scale2, shift1, shift2]). The model is the official function for
the "exact" and "flash" attention backends; "poly" / "favor" swap in an approximation of the same
block-causal attention, and ``max_temperature`` lowers the clamp of the per-head temperature so
that every attention logit (cosine times temperature) stays inside a bound that
``attention.plan`` can certify.

Two forwards share every parameter: ``__call__`` is teacher forcing over all L tokens (training,
likelihood), and ``init_decode_states`` / ``embed_scale`` / ``decode_scale`` run one scale at a
time on a KV cache or a low-rank running state (sampling). Feeding the sampling path the
teacher-forcing inputs gives the same logits (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import attention, checks, scales
from var_jax.models import construct, decay

# Rematerialisation of the blocks: names of `jax.checkpoint_policies` ("full" = save nothing).
REMAT_POLICIES = ("none", "full", "dots_saveable")
# Gains of the released models' AdaLN gamma rows (README launch commands, `--alng`).
_RELEASED_ALNG = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 5e-6}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Hyper-parameters of a VAR transformer.

    ``width`` / ``num_heads`` / ``drop_path_rate`` default (None) to the official size rule
    (64 * depth, depth, 0.1 * depth / 24). ``attn_options`` is a tuple of (name, value) pairs (a
    dict is accepted and converted) passed to the attention backend. ``max_temperature`` is the
    clamp of exp(scale_mul) (100 in the official code), hence the bound of every attention logit.
    ``dtype`` is the activation dtype, ``param_dtype`` the parameters'.
    """

    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    patch_nums: tuple[int, ...] = scales.SCHEDULES["256"]
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    norm_eps: float = 1e-6
    drop_path_rate: float | None = None
    cond_drop_rate: float = 0.1
    attn_backend: str = "exact"
    attn_options: Any = ()
    attn_seed: int = 0
    max_temperature: float = 100.0
    init_std: float | None = None
    init_aln: float = 0.5
    init_alng: float = 1e-5
    init_head: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)
        fix("depth", checks.positive_int("VARConfig.depth", self.depth))
        fix("width", checks.positive_int("VARConfig.width", self.width)
            if self.width is not None else 64 * self.depth)
        fix("num_heads", checks.positive_int("VARConfig.num_heads", self.num_heads)
            if self.num_heads is not None else self.depth)
        if self.width % self.num_heads:
            raise ValueError(f"VARConfig.width must be a positive multiple of num_heads "
                             f"({self.num_heads}), got {self.width}")
        fix("patch_nums", scales.validate_schedule(self.patch_nums))
        if self.drop_path_rate is None:
            fix("drop_path_rate", 0.1 * self.depth / 24)
        if isinstance(self.attn_options, Mapping):
            fix("attn_options", tuple(sorted(self.attn_options.items())))
        else:
            fix("attn_options", tuple(tuple(kv) for kv in self.attn_options))
        if self.attn_backend not in attention.BACKENDS:
            raise ValueError(f"VARConfig.attn_backend must be one of {attention.BACKENDS}, got "
                             f"{self.attn_backend!r}")
        checks.positive_number("VARConfig.max_temperature", self.max_temperature)
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"VARConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        fix("scan_layers", bool(self.scan_layers))
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"VARConfig.remat must be one of {REMAT_POLICIES}, got "
                             f"{self.remat!r}")
        # Resolves "auto" and checks the options now, not at the first trace.
        backend, options = self.attention
        attention.check_backend_options(backend, options)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"VARConfig.{name} must be one of {_DTYPES}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("vocab_size", "cvae", "num_classes"):
            fix(name, checks.positive_int(f"VARConfig.{name}", getattr(self, name)))

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def seq_len(self) -> int:
        return scales.token_layout(self.patch_nums).seq_len

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(1 / (3 * self.width))

    @property
    def options(self) -> dict:
        return dict(self.attn_options)

    @property
    def attention(self) -> tuple[str, dict]:
        """(backend, options) the layers run. "auto" is resolved here by ``attention.plan``
        with the model's own logit bound: q and k are unit vectors and q carries the clamped
        temperature, so |q . k| <= ``max_temperature``. Its one option is ``eps`` (target
        relative error of the attention weights, default 1 / L)."""
        if self.attn_backend != "auto":
            return self.attn_backend, self.options
        return _resolve_auto(self.max_temperature, self.head_dim, self.patch_nums,
                             self.attn_options)

    # Presets.
    @classmethod
    def official(cls, depth: int, shared_aln: bool = False, patch_nums=None, **overrides):
        """The released models' configuration (d16/d20/d24/d30 at 256px, d36-s at 512px)."""
        if patch_nums is None:
            patch_nums = scales.SCHEDULES["512" if shared_aln else "256"]
        fields = dict(depth=depth, shared_aln=shared_aln, patch_nums=tuple(patch_nums),
                      init_alng=_RELEASED_ALNG.get(depth, 1e-5))
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def tiny(cls, **overrides):
        """A CPU-sized model for tests and the demo; matches ``VQVAEConfig.tiny()`` (scales
        (1, 2, 3, 4, 6, 8), 256 codes of 16 channels), 10 classes."""
        fields = dict(depth=2, width=64, num_heads=2, patch_nums=(1, 2, 3, 4, 6, 8),
                      vocab_size=256, cvae=16, num_classes=10, init_alng=1e-3)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["patch_nums"] = list(self.patch_nums)
        out["attn_options"] = dict(self.attn_options)
        return out

    @classmethod
    def from_dict(cls, fields: Mapping) -> VARConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"VARConfig.from_dict: unknown fields {sorted(unknown)}")
        fields = dict(fields)
        if "patch_nums" in fields:
            fields["patch_nums"] = tuple(fields["patch_nums"])
        return cls(**fields)


@functools.lru_cache(maxsize=64)
def _resolve_auto(logit_bound: float, head_dim: int, patch_nums: tuple, options: tuple):
    opts = dict(options)
    unknown = sorted(set(opts) - {"eps"})
    if unknown:
        raise ValueError(f"VARConfig.attn_options for attn_backend 'auto' takes only eps (the "
                         f"logit bound is max_temperature), got {unknown}")
    backend, chosen = attention.resolve_auto(float(logit_bound), head_dim, patch_nums,
                                             opts.get("eps"))
    return backend, dict(chosen)


# ----------------------------------------------------------------------------------------------
# Pure functions.

def layer_norm(x, eps: float):
    """LayerNorm without affine parameters (torch's elementwise_affine=False); float32 stats."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def modulate(x, scale, shift):
    return x * (1 + scale) + shift


def drop_path(x_BxLxC, rate, key):
    """Stochastic depth per sample (timm semantics, survivors scaled by 1 / keep).

    ``rate`` may be traced (a scanned per-layer value); at rate 0 every sample survives and
    the output equals the input exactly. ``key`` None (evaluation) switches it off.
    """
    if key is None:
        return x_BxLxC
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, keep, (x_BxLxC.shape[0],) + (1,) * (x_BxLxC.ndim - 1))
    return x_BxLxC * mask.astype(x_BxLxC.dtype) / keep.astype(x_BxLxC.dtype)


def drop_labels(labels_B, rate: float, num_classes: int, key):
    """Label dropout: each label becomes the unconditional class ``num_classes`` w.p. ``rate``."""
    drop = jax.random.uniform(key, labels_B.shape) < rate
    return jnp.where(drop, num_classes, labels_B)


def token_cross_entropy(logits_BxLxV, targets_BxL):
    """Per-token cross-entropy (B, L) float32; the official loss is its plain mean."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), -1)[..., 0]
    return lse - picked


def flatten_token_maps(token_maps) -> jax.Array:
    """A list of (B, pn, pn) or (B, pn*pn) token maps -> (B, L) int32 targets."""
    return jnp.concatenate([jnp.reshape(t, (t.shape[0], -1)) for t in token_maps],
                           axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Modules.

def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
    # A plain normal: torch's trunc_normal_(std=s) truncates at +-2 absolute, i.e. not at all
    # for the tiny stds used here, while Flax's truncated_normal would truncate at +-2 std.
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class AdaLinear(nnx.Module):
    """SiLU -> Linear(C, n*C) viewed as n chunks: kernel (C, n, C), bias (n, C)."""

    def __init__(self, width: int, chunks: int, chunk_gains, std: float, *, param_dtype, rngs):
        gains = jnp.asarray(chunk_gains, jnp.float32)[None, :, None]
        kernel = _normal(rngs, (width, chunks, width), std, jnp.float32) * gains
        self.kernel = nnx.Param(kernel.astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((chunks, width), param_dtype))

    def __call__(self, cond_BxC, dtype):
        h = jax.nn.silu(cond_BxC.astype(jnp.float32)).astype(dtype)
        out = jnp.einsum("bc,cnd->bnd", h, self.kernel[...].astype(dtype))
        return out + self.bias[...].astype(dtype)


class SelfAttention(nnx.Module):
    """Cosine attention: L2-normalised q, k, clamped learnable per-head temperature on q.

    Holds no per-layer constants: the random projection key of favor (``rng``) comes in as an
    argument, so that one stacked module serves every layer of a scan.
    """

    def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
        c, h, d = config.width, config.num_heads, config.head_dim
        std, pdt = config.resolved_init_std, jnp.dtype(config.param_dtype)
        self.config = config
        self.qkv_kernel = nnx.Param(_normal(rngs, (c, 3, h, d), std, pdt))
        self.q_bias = nnx.Param(jnp.zeros((h, d), pdt))
        self.v_bias = nnx.Param(jnp.zeros((h, d), pdt))
        self.scale_mul = nnx.Param(jnp.full((h,), math.log(4.0), pdt))  # log-space temperature
        self.proj = nnx.Linear(c, c, dtype=jnp.dtype(config.dtype), param_dtype=pdt,
                               kernel_init=nnx.initializers.normal(
                                   std / math.sqrt(2 * config.depth)),
                               rngs=rngs)

    def temperature(self):
        """exp(min(scale_mul, log max_temperature)) per head, float32 (H,) ((depth, H) when
        the module is a stack of layers)."""
        log_max = math.log(self.config.max_temperature)
        return jnp.exp(jnp.minimum(self.scale_mul[...].astype(jnp.float32), log_max))

    def qkv(self, x_BxLxC, kernels: LayerKernels | None = None, *, one_product=False):
        """q, k, v (B, L, H, D). ``one_product`` (decoding, no backward pass): one product
        with the whole kernel, its output sliced, instead of three products with slices of
        the kernel, which XLA:CPU copies first; ``kernels``: that product with this layer's
        kernel read in place (:class:`LayerKernels`)."""
        dtype = jnp.dtype(self.config.dtype)
        x = x_BxLxC.astype(dtype)
        if kernels is not None or one_product:
            flat = (kernels.product("qkv", x) if kernels is not None
                    else flat_product(x, self.qkv_kernel[...]))
            qkv = flat.reshape(x.shape[:2] + self.qkv_kernel.shape[-3:])
            q, k, v = (qkv[:, :, i] for i in range(3))
        else:
            kernel = self.qkv_kernel[...].astype(dtype)
            # Three products instead of one into (B, L, 3, H, D) then sliced: the same sums,
            # but the backward of the slices concatenated the three gradients into a
            # transposed copy before one dot (on a CPU the demo model's train step is 5-8%
            # faster without it; not measured on an accelerator, where each of the three is
            # still a full-width matmul).
            q, k, v = (over_rows(lambda rows, i=i: jnp.einsum("nc,chd->nhd", rows, kernel[:, i]),
                                 x) for i in range(3))
        q = q + self.q_bias[...].astype(dtype)
        v = v + self.v_bias[...].astype(dtype)
        q = l2_normalize(q) * self.temperature()[:, None].astype(dtype)
        return q, l2_normalize(k), v

    def _out(self, o_BxLxHxD, kernels: LayerKernels | None = None):
        b, n = o_BxLxHxD.shape[:2]
        o = o_BxLxHxD.reshape(b, n, self.config.width)
        if kernels is None:
            return over_rows(self.proj, o)
        return kernels.product("proj", o) + self.proj.bias[...].astype(o.dtype)

    def __call__(self, x_BxLxC, rng):
        backend, options = self.config.attention
        q, k, v = self.qkv(x_BxLxC)
        # The whole schedule, or its leading scales for a shorter sequence (a coarse prefix).
        patch_nums = scales.leading_scales(self.config.patch_nums, x_BxLxC.shape[1])
        o = attention.block_causal_attention(q, k, v, patch_nums, backend=backend, rng=rng,
                                             **options)
        return self._out(o)

    def decode(self, x_BxlxC, state, scale, kernels: LayerKernels | None = None):
        """One scale on the decode state; ``scale``: its index, or an
        ``attention.PaddedScale`` (rows padded, traced offsets: ``attention.decode_rows``)."""
        backend, options = self.config.attention
        q, k, v = self.qkv(x_BxlxC, kernels, one_product=True)
        if isinstance(scale, attention.PaddedScale):
            o, state = attention.decode_rows(state, q, k, v, scale.begin, scale.end,
                                             backend=backend, **options)
        else:
            o, state = attention.decode_scale(state, q, k, v, scale, backend=backend, **options)
        return self._out(o, kernels), state


def init_attention_state(config: VARConfig, batch: int, rng) -> attention.DecodeState:
    """One layer's empty decode state (KV cache or low-rank sums) for the resolved backend."""
    backend, options = config.attention
    return attention.init_decode_state(backend, batch, config.num_heads, config.head_dim,
                                       config.patch_nums, dtype=jnp.dtype(config.dtype),
                                       rng=rng, **options)


class FFN(nnx.Module):
    def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
        std, c, hidden = config.resolved_init_std, config.width, config.hidden
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                  rngs=rngs)
        self.fc1 = nnx.Linear(c, hidden, kernel_init=nnx.initializers.normal(std), **kw)
        self.fc2 = nnx.Linear(hidden, c, kernel_init=nnx.initializers.normal(
            std / math.sqrt(2 * config.depth)), **kw)

    def __call__(self, x, kernels: LayerKernels | None = None):
        if kernels is None:
            return over_rows(lambda rows: self.fc2(jax.nn.gelu(self.fc1(rows), approximate=True)),
                             x)
        h = kernels.product("fc1", x) + self.fc1.bias[...].astype(x.dtype)
        h = jax.nn.gelu(h, approximate=True)
        return kernels.product("fc2", h) + self.fc2.bias[...].astype(h.dtype)


class AdaLNSelfAttn(nnx.Module):
    """x += g1 * Attn(LN(x)(1+s1)+b1); x += g2 * FFN(LN(x)(1+s2)+b2), with drop-path.

    What differs between layers besides the weights (the drop-path rate, the attention's
    random key, the drop-path key) arrives as a :class:`LayerInputs`, so the same code runs as
    one scanned body over stacked weights or as a Python loop over separate blocks.
    """

    def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.attn = SelfAttention(config, rngs=rngs)
        self.ffn = FFN(config, rngs=rngs)
        aln, alng = config.init_aln, config.init_alng
        gains = (alng, alng, aln, aln, aln, aln)
        if config.shared_aln:
            gss = jax.random.normal(rngs.params(), (6, config.width)) / math.sqrt(config.width)
            gss = gss * jnp.asarray(gains)[:, None]
            self.ada_gss = nnx.Param(gss.astype(jnp.dtype(config.param_dtype)))
        else:
            self.ada_lin = AdaLinear(config.width, 6, gains, config.resolved_init_std,
                                     param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def modulation(self, cond):
        """(B, 6, C) chunks [g1, g2, s1, s2, b1, b2] from cond (B, C) or the shared (B, 6, C)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.shared_aln:
            return cond.astype(dtype) + self.ada_gss[...].astype(dtype)
        return self.ada_lin(cond, dtype)

    def _residuals(self, x, ada_Bx6xC, attend, drop_rate, drop_key, kernels=None):
        g1, g2, s1, s2, b1, b2 = (ada_Bx6xC[:, None, i] for i in range(6))
        eps = self.config.norm_eps
        keys = (None, None) if drop_key is None else tuple(jax.random.split(drop_key))
        h, extra = attend(modulate(layer_norm(x, eps), s1, b1))
        x = x + drop_path(h * g1, drop_rate, keys[0])
        h = self.ffn(modulate(layer_norm(x, eps), s2, b2), kernels)
        x = x + drop_path(h * g2, drop_rate, keys[1])
        return x, extra

    def __call__(self, x_BxLxC, cond, layer: LayerInputs):
        x, _ = self._residuals(x_BxLxC, self.modulation(cond),
                               lambda h: (self.attn(h, layer.attn_rng), None),
                               layer.drop_rate, layer.drop_key)
        return x

    def decode(self, x_BxlxC, ada_Bx6xC, state, scale, kernels: LayerKernels | None = None):
        """One scale on the decode state, given this block's modulation (see ``modulation``:
        the condition is the same at every scale, so the sampler computes it once).
        ``scale``: as ``SelfAttention.decode``. ``kernels``: this layer's matmul kernels read
        in place (:class:`LayerKernels`), instead of the module's own."""
        return self._residuals(x_BxlxC, ada_Bx6xC,
                               lambda h: self.attn.decode(h, state, scale, kernels), 0.0,
                               None, kernels)


class AdaLNBeforeHead(nnx.Module):
    def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.ada_lin = AdaLinear(config.width, 2, (config.init_aln,) * 2,
                                 config.resolved_init_std,
                                 param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def __call__(self, x_BxLxC, cond_BxC):
        ada = self.ada_lin(cond_BxC, x_BxLxC.dtype)  # chunks [scale, shift]
        return modulate(layer_norm(x_BxLxC, self.config.norm_eps), ada[:, None, 0],
                        ada[:, None, 1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What each layer gets besides its weights, stacked along a leading layer axis."""

    drop_rate: jax.Array          # (depth,) float32 drop-path rate, linear from 0
    attn_rng: jax.Array           # (depth,) keys of the attention's random features (favor)
    drop_key: jax.Array | None    # (depth,) drop-path keys; None when deterministic

    def layer(self, i: int) -> LayerInputs:
        return jax.tree.map(lambda a: a[i], self)


def over_rows(fn, x_BxLxC):
    """``fn`` (a product with a weight, row by row) on x with its leading axes flattened into
    one row axis, its output reshaped back.

    Why: the weight's gradient then contracts over one axis (rows) instead of two (B, L), and
    XLA:CPU runs a two-axis contraction as transposed copies of the activations and output
    gradients followed by the product: a sixth of the XLA operations' time in a trace of the
    demo's VAR step, which runs 1.07-1.15x as fast without them on a 2.6 GHz Xeon (no gain
    showed through the noise of a slow hour on a Zen 3; docs/train_benchmark.md). The same
    sums in another order; the reshapes of contiguous rows are bitcasts."""
    y = fn(x_BxLxC.reshape(-1, x_BxLxC.shape[-1]))
    return y.reshape(x_BxLxC.shape[:-1] + y.shape[1:])


def flat_product(x_BxLxCin, kernel) -> jax.Array:
    """x @ kernel (C_in, ...) with the kernel's output axes flattened -> (B, L, N), in x's
    dtype. ``lax.dot_general`` rather than einsum: the sampler traces it once per layer, scale
    and product (``LayerKernels.product``)."""
    flat = kernel.reshape(kernel.shape[0], -1).astype(x_BxLxCin.dtype)
    return jax.lax.dot_general(x_BxLxCin, flat, (((2,), (0,)), ((), ())))


def _single_cpu_array(x) -> bool:
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            and len(x.devices()) == 1 and next(iter(x.devices())).platform == "cpu")


# The blocks' matmul kernels by name: where each lives in a block.
_KERNEL_PATHS = {"qkv": ("attn", "qkv_kernel"), "proj": ("attn", "proj", "kernel"),
                 "fc1": ("ffn", "fc1", "kernel"), "fc2": ("ffn", "fc2", "kernel")}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """The stacked blocks' matmul kernels as one array per layer, read by layer index.

    Why: inside a scan over layers XLA:CPU copies each layer's dynamic slice of a stacked
    kernel into a new buffer before the dot (at d16, 50 MB a layer at every scale: about 8 GB
    of copying a sample). A dot inside a ``lax.switch`` branch over separate per-layer arrays
    reads its kernel where it lies, as the looped layout's dots do. For sampling only (a
    switch's backward pass would touch every layer's gradient), where the copies are slow (the
    sampler uses it on a CPU).
    """

    per_layer: dict                 # name -> tuple of depth arrays (C_in, ...)
    layer: jax.Array | None = None  # () int32, the layer a scan step reads

    @classmethod
    def split(cls, stacked_blocks) -> LayerKernels:
        """Per-layer kernels of stacked blocks. Concrete arrays on one CPU device are split
        without copying (each layer a view of the stacked buffer: a numpy slice put back on
        the device, which XLA:CPU takes zero-copy when aligned, else copies); traced or other
        arrays by slicing (a copy)."""
        per_layer = {}
        for name, path in _KERNEL_PATHS.items():
            node = stacked_blocks
            for attr in path:
                node = getattr(node, attr)
            kernel = node[...]
            if _single_cpu_array(kernel):
                host = np.asarray(kernel)  # a view of the device buffer on a CPU
                device = next(iter(kernel.devices()))
                per_layer[name] = tuple(jax.device_put(host[i], device)
                                        for i in range(kernel.shape[0]))
            else:
                per_layer[name] = tuple(kernel[i] for i in range(kernel.shape[0]))
        return cls(per_layer)

    def at(self, layer) -> LayerKernels:
        return dataclasses.replace(self, layer=layer)

    def product(self, name: str, x_BxLxCin) -> jax.Array:
        """:func:`flat_product` with this layer's kernel ``name``, read in place."""
        branches = [functools.partial(flat_product, kernel=k) for k in self.per_layer[name]]
        return jax.lax.switch(self.layer, branches, x_BxLxCin)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCondition:
    """What a sampling run computes once for all scales: ``cond`` (B, C) for the head and the
    start token, ``ada`` (depth, B, 6, C) every block's modulation, and optionally ``kernels``
    (:class:`LayerKernels`, scanned layout: the matmul kernels split per layer)."""

    cond: jax.Array
    ada: jax.Array
    kernels: LayerKernels | None = None


def _checkpointed(fn, policy_name: str):
    """``fn`` under ``jax.checkpoint`` with the named ``jax.checkpoint_policies`` policy ("full":
    save nothing, recompute everything in the backward pass); "none" leaves it alone."""
    if policy_name == "none":
        return fn
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    return jax.checkpoint(fn, policy=policy)


def scan_blocks(fn, carry, blocks, xs, remat: str = "none"):
    """``fn(block, carry, x) -> (carry, y)`` over stacked blocks with ``jax.lax.scan``.

    The blocks' parameters are split once into (graph, stacked arrays); each step merges one
    layer's slice into a module. Why not ``nnx.scan``: split / merge is a pure function of
    arrays, so the model also works when it is closed over by ``jax.jit`` / ``jax.grad``
    (``nnx.scan`` refuses modules from another trace level). The blocks hold no state that a
    forward pass changes, so nothing has to be written back.
    """
    graphdef, params = nnx.split(blocks)

    def body(carry, inputs):
        layer_params, x = inputs
        return fn(nnx.merge(graphdef, layer_params), carry, x)

    return jax.lax.scan(_checkpointed(body, remat), carry, (params, xs))


def unroll_blocks(fn, carry, blocks, xs):
    """:func:`scan_blocks` as a Python loop over static slices of the stacked blocks (ys
    stacked). No ``while`` loop: XLA:CPU runs the elementwise work of a loop body 2-3x slower
    than the same work outside one (docs/scan_layers.md), which the sampler avoids where most
    of its time goes, at the price of compiling those layers one by one."""
    graphdef, params = nnx.split(blocks)
    depth = jax.tree.leaves(params)[0].shape[0]
    ys = []
    for i in range(depth):
        take = functools.partial(lambda a, i: a[i], i=i)
        carry, y = fn(nnx.merge(graphdef, jax.tree.map(take, params)), carry,
                      jax.tree.map(take, xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def scan_blocks_kv_cache(fn, x, blocks, xs, states, begin, read_len: int):
    """:func:`scan_blocks` for one scale's decode on stacked KV-cache states, with the caches
    in the loop carry instead of the scanned inputs and outputs.

    Scanning the caches as xs / ys makes every layer step copy its whole (B, L, H, D) cache in
    and out, and every scale copy the whole stack between scans (17 copies of 178 MB per d16
    sample, counted in the compiled program; docs/scan_layers.md). Here step i cuts layer i's
    cache at ``read_len`` (all the attention reads: the scale's end, or a bucket's), runs
    ``fn(block, x, (x_i, state_i))`` and writes back only the scale's x.shape[1] new keys and
    values at ``begin`` (an int, or traced for a padded scale), in place in the carry.
    """
    graphdef, params = nnx.split(blocks)
    caches = states.arrays
    rows = x.shape[1]

    def body(carry, inputs):
        x, caches = carry
        layer_params, x_i, i = inputs
        prefix = {name: jax.lax.dynamic_slice(cache, (i,) + (0,) * (cache.ndim - 1),
                                              (1, cache.shape[1], read_len) + cache.shape[3:])[0]
                  for name, cache in caches.items()}
        x, state = fn(nnx.merge(graphdef, layer_params), x,
                      (x_i, dataclasses.replace(states, arrays=prefix)))
        new = {name: jax.lax.dynamic_slice_in_dim(state.arrays[name], begin, rows, axis=1)
               for name in caches}
        caches = {name: jax.lax.dynamic_update_slice(
                      cache, new[name][None].astype(cache.dtype),
                      (i, 0, begin) + (0,) * (cache.ndim - 3))
                  for name, cache in caches.items()}
        return (x, caches), None

    depth = jax.tree.leaves(params)[0].shape[0]
    (x, caches), _ = jax.lax.scan(body, (x, caches), (params, xs, jnp.arange(depth)))
    return x, dataclasses.replace(states, arrays=caches)


def loop_blocks(fn, carry, blocks, xs, remat: str = "none"):
    """The same as :func:`scan_blocks` over a list of blocks, as a Python loop (ys stacked)."""
    def step(layer_params, carry, x, *, graphdef):
        return fn(nnx.merge(graphdef, layer_params), carry, x)

    ys = []
    for i, block in enumerate(blocks):
        graphdef, params = nnx.split(block)
        layer_step = _checkpointed(functools.partial(step, graphdef=graphdef), remat)
        carry, y = layer_step(params, carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return carry, (None if all(y is None for y in ys)
                   else jax.tree.map(lambda *a: jnp.stack(a), *ys))


class VAR(nnx.Module):
    """The VAR transformer. ``__call__`` is teacher forcing; the decode methods serve sampling.

    ``blocks`` is one :class:`AdaLNSelfAttn` whose parameters have a leading layer axis
    (``config.scan_layers``, the default: made with ``nnx.vmap``, applied with one scan
    (:func:`scan_blocks`), so the compiled program holds one block whatever the depth), or an
    ``nnx.List`` of ``depth`` blocks applied in a Python loop (for comparison and debugging).
    Both compute the same function; ``convert.var.relayout`` moves parameters between them.
    """

    def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, std = config.width, config.resolved_init_std
        pdt, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        layout = scales.token_layout(config.patch_nums)
        self.begin_ends = tuple(layout.begin_ends)
        normal = nnx.initializers.normal(std)
        self.class_emb = nnx.Embed(config.num_classes + 1, c, dtype=dt, param_dtype=pdt,
                                   embedding_init=normal, rngs=rngs)
        self.word_embed = nnx.Linear(config.cvae, c, dtype=dt, param_dtype=pdt,
                                     kernel_init=normal, rngs=rngs)
        self.pos_start = nnx.Param(_normal(rngs, (1, c), std, pdt))
        self.pos_1LC = nnx.Param(_normal(rngs, (layout.seq_len, c), std, pdt))
        self.lvl_embed = nnx.Embed(config.num_scales, c, dtype=dt, param_dtype=pdt,
                                   embedding_init=normal, rngs=rngs)
        if config.shared_aln:
            self.shared_ada_lin = AdaLinear(c, 6, (1.0,) * 6, std, param_dtype=pdt, rngs=rngs)
        if config.scan_layers:
            @nnx.split_rngs(splits=config.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(layer_rngs):
                return AdaLNSelfAttn(config, rngs=layer_rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([AdaLNSelfAttn(config, rngs=rngs)
                                    for _ in range(config.depth)])
        self.head_nm = AdaLNBeforeHead(config, rngs=rngs)
        self.head = nnx.Linear(c, config.vocab_size, dtype=dt, param_dtype=pdt,
                               kernel_init=nnx.initializers.normal(std * config.init_head),
                               rngs=rngs)

    # -- pieces shared by both forwards -----------------------------------------------------
    def condition(self, labels_B):
        """class_emb(labels): both the start token and the AdaLN condition, (B, C)."""
        return self.class_emb(jnp.asarray(labels_B, jnp.int32))

    def block_condition(self, cond_BxC):
        """What the blocks receive: cond itself, or the shared AdaLN output (B, 6, C)."""
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_BxC, jnp.dtype(self.config.dtype))
        return cond_BxC

    def layer_inputs(self, drop_key=None) -> LayerInputs:
        """Per-layer drop-path rates, favor keys (fixed per layer, so both forwards agree) and
        drop-path keys (split from ``drop_key``; None when deterministic)."""
        cfg = self.config
        rates = jnp.asarray(np.linspace(0, cfg.drop_path_rate, cfg.depth), jnp.float32)
        base = jax.random.key(cfg.attn_seed)
        attn_rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(cfg.depth))
        keys = None if drop_key is None else jax.random.split(drop_key, cfg.depth)
        return LayerInputs(rates, attn_rngs, keys)

    def _level_pos(self, begin: int, end: int):
        level_ids = scales.token_layout(self.config.patch_nums).level_ids
        lvl = self.lvl_embed(jnp.asarray(level_ids[begin:end]))
        return lvl + self.pos_1LC[begin:end].astype(lvl.dtype)

    def embed_scale(self, scale_index: int, cond_BxC, x_BxlxCvae=None):
        """Input tokens of one scale: the start token at scale 0, word_embed(x) after."""
        if isinstance(cond_BxC, DecodeCondition):
            cond_BxC = cond_BxC.cond
        begin, end = self.begin_ends[scale_index]
        if scale_index == 0:
            tokens = cond_BxC[:, None] + self.pos_start[...].astype(cond_BxC.dtype)
        else:
            tokens = self.word_embed(x_BxlxCvae)
        return tokens + self._level_pos(begin, end)

    def logits(self, x_BxLxC, cond_BxC):
        h = self.head_nm(x_BxLxC, cond_BxC)
        kernel = self.head.kernel[...].astype(h.dtype)
        out = over_rows(lambda rows: jnp.einsum("nc,cv->nv", rows, kernel,
                                                preferred_element_type=jnp.float32), h)
        return out + self.head.bias[...].astype(jnp.float32)

    # -- teacher forcing --------------------------------------------------------------------
    def __call__(self, labels_B, x_BxLm1xCvae, *, deterministic: bool = True, rngs=None):
        """Teacher-forced logits (B, L, V) float32.

        ``x_BxLm1xCvae``: the VQ-VAE's teacher-forcing inputs (scales 1..K-1), or only their
        first rows, up to the end of scale k - 1: then the logits are those of the first k
        scales (a coarse prefix, which the block-causal mask makes a sequence of its own; the
        same values as the full sequence's first rows). When ``deterministic`` is False,
        ``rngs`` (a ``jax.random.key`` or an ``nnx.Rngs`` with a 'dropout' stream) drives label
        dropout (rate ``cond_drop_rate``) and drop-path.
        """
        cfg = self.config
        labels_B = jnp.asarray(labels_B, jnp.int32)
        if x_BxLm1xCvae.ndim != 3 or x_BxLm1xCvae.shape[2] != cfg.cvae:
            raise ValueError(f"x_BxLm1xCvae must have shape (B, {cfg.seq_len - 1}, {cfg.cvae}), "
                             f"got {x_BxLm1xCvae.shape}")
        seq_len = x_BxLm1xCvae.shape[1] + 1
        if seq_len != cfg.seq_len:
            try:
                scales.leading_scales(cfg.patch_nums, seq_len)
            except ValueError as err:
                raise ValueError(f"x_BxLm1xCvae must have shape (B, {cfg.seq_len - 1}, "
                                 f"{cfg.cvae}) or hold the inputs of leading scales only, got "
                                 f"{x_BxLm1xCvae.shape}: {err}") from None
        if labels_B.shape != (x_BxLm1xCvae.shape[0],):
            raise ValueError(f"labels_B must have shape ({x_BxLm1xCvae.shape[0]},), got "
                             f"{labels_B.shape}")
        drop_key = None
        if not deterministic:
            if rngs is None:
                raise ValueError("VAR.__call__(deterministic=False) needs rngs (a key or an "
                                 "nnx.Rngs) for label dropout and drop-path")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            label_key, drop_key = jax.random.split(key)
            if cfg.cond_drop_rate > 0:
                labels_B = drop_labels(labels_B, cfg.cond_drop_rate, cfg.num_classes, label_key)
        cond = self.condition(labels_B)
        first = cond[:, None] + self.pos_start[...].astype(cond.dtype)
        words = over_rows(self.word_embed, x_BxLm1xCvae)
        x = jnp.concatenate([first, words.astype(first.dtype)], axis=1)
        x = x + self._level_pos(0, seq_len)
        x = self._apply_blocks(x, self.block_condition(cond), self.layer_inputs(drop_key))
        return self.logits(x, cond)

    def _apply_blocks(self, x_BxLxC, block_cond, layers: LayerInputs):
        def step(block, x, layer):
            return block(x, block_cond, layer), None

        over_layers = scan_blocks if self.config.scan_layers else loop_blocks
        return over_layers(step, x_BxLxC, self.blocks, layers, self.config.remat)[0]

    # -- sampling path ----------------------------------------------------------------------
    def init_decode_states(self, batch: int):
        """Every layer's attention decode state (KV cache or low-rank running sums): one state
        with a leading layer axis (scanned layout) or a list of ``depth`` states (looped)."""
        rngs = self.layer_inputs().attn_rng
        if self.config.scan_layers:
            return jax.vmap(lambda rng: init_attention_state(self.config, batch, rng))(rngs)
        return [init_attention_state(self.config, batch, rngs[i])
                for i in range(self.config.depth)]

    def decode_condition(self, cond_BxC, kernels: LayerKernels | None = None
                         ) -> DecodeCondition:
        """The per-block modulations of a sampling run, computed once instead of per scale.
        ``kernels`` (scanned layout; ``LayerKernels.split(self.blocks)``): the matmul kernels
        the scanned decode reads in place instead of slicing the stacked ones."""
        if isinstance(cond_BxC, DecodeCondition):
            return cond_BxC
        block_cond = self.block_condition(cond_BxC)
        if self.config.scan_layers:  # every layer at once: a batched product, no layer slices
            graphdef, params = nnx.split(self.blocks)
            # The condition broadcast along the layer axis too, so that the product is batched
            # on both sides (a condition shared by all layers made XLA transpose the stacked
            # kernels first).
            conds = jnp.broadcast_to(block_cond, (self.config.depth,) + block_cond.shape)
            ada = jax.vmap(lambda p, c: nnx.merge(graphdef, p).modulation(c))(params, conds)
        else:
            _, ada = loop_blocks(lambda block, carry, _: (carry, block.modulation(block_cond)),
                                 None, self.blocks, jnp.arange(self.config.depth))
        return DecodeCondition(cond_BxC, ada, kernels)

    def embed_rows(self, begin, rows: int, cond_2BxC, x_BxPxCvae, is_start=None):
        """:meth:`embed_scale` for a scale padded to ``rows`` tokens from ``begin`` (traced),
        both halves of a guided batch at once -> (2B, rows, C): word_embed(x) for both halves,
        or the start token where ``is_start`` (a traced bool; None: never). Rows past the
        sequence take its last position's embedding (padding, dropped by the caller)."""
        if isinstance(cond_2BxC, DecodeCondition):
            cond_2BxC = cond_2BxC.cond
        layout = scales.token_layout(self.config.patch_nums)
        positions = jnp.minimum(begin + jnp.arange(rows), layout.seq_len - 1)
        lvl = self.lvl_embed(jnp.asarray(layout.level_ids)[positions])
        level_pos = lvl + self.pos_1LC[...][positions].astype(lvl.dtype)
        words = self.word_embed(x_BxPxCvae)
        tokens = jnp.concatenate([words, words], axis=0)
        if is_start is not None:
            start = cond_2BxC[:, None] + self.pos_start[...].astype(cond_2BxC.dtype)
            tokens = jnp.where(is_start, start.astype(tokens.dtype), tokens)
        return tokens + level_pos

    def decode_rows(self, tokens_BxPxC, condition, states, begin, end, read_len: int):
        """:meth:`decode_scale` for a scale padded to P rows at traced offsets [begin, end),
        its attention reading the keys [0, ``read_len``) of the caches, those from ``end`` on
        masked (``scales.sampling_buckets``: scales of one bucket share this compiled step).
        Scanned layout with a KV-cache backend only. -> (logits (B, P, V), states); the
        padded rows' logits are to be dropped."""
        if not self.config.scan_layers or attention.registry.get(states.backend).step_rows is None:
            raise ValueError("decode_rows needs the scanned layout and a KV-cache attention "
                             f"backend, got scan_layers={self.config.scan_layers}, backend "
                             f"{states.backend!r}")
        condition = self.decode_condition(condition)
        step = self._decode_step(condition, attention.PaddedScale(begin, end))
        x, states = scan_blocks_kv_cache(step, tokens_BxPxC, self.blocks,
                                         (condition.ada, jnp.arange(self.config.depth)),
                                         states, begin, read_len)
        return self.logits(x, condition.cond), states

    def _decode_step(self, condition: DecodeCondition, scale):
        kernels = condition.kernels if self.config.scan_layers else None

        def step(block, x, inputs):
            (ada, layer), state = inputs
            layer_kernels = None if kernels is None else kernels.at(layer)
            return block.decode(x, ada, state, scale, layer_kernels)

        return step

    def decode_scale(self, tokens_BxlxC, condition, states, scale_index: int, *,
                     unroll_layers: bool = False):
        """One scale through every block on the decode states -> (logits (B, l, V), states).

        ``condition``: a :class:`DecodeCondition` (``decode_condition(cond)``, computed once per
        sampling run) or the raw cond (B, C). ``unroll_layers`` (scanned layout only): apply
        the stacked layers one by one (:func:`unroll_blocks`) instead of under one scan; the
        same function, faster on XLA:CPU, slower to compile.
        """
        condition = self.decode_condition(condition)
        step = self._decode_step(condition, scale_index)
        per_layer = (condition.ada, jnp.arange(self.config.depth))
        if self.config.scan_layers and not unroll_layers and \
                attention.registry.get(states.backend).kv_cache:
            begin, end = self.begin_ends[scale_index]
            x, states = scan_blocks_kv_cache(step, tokens_BxlxC, self.blocks, per_layer,
                                             states, begin, end)
        elif self.config.scan_layers:
            over_layers = unroll_blocks if unroll_layers else scan_blocks
            x, states = over_layers(step, tokens_BxlxC, self.blocks, (per_layer, states))
        else:  # a list of per-layer states in, a list out
            x, new_states = tokens_BxlxC, []
            for i, (block, state) in enumerate(zip(self.blocks, states, strict=True)):
                x, state = step(block, x, ((condition.ada[i], i), state))
                new_states.append(state)
            states = new_states
        return self.logits(x, condition.cond), states

    def logit_bounds(self):
        """Per layer, the largest attention logit possible: max over heads of the temperature."""
        if self.config.scan_layers:
            return jnp.max(self.blocks.attn.temperature(), axis=-1)
        return jnp.stack([jnp.max(block.attn.temperature()) for block in self.blocks])


# ----------------------------------------------------------------------------------------------
# Helpers for training and analysis.

def count_params(config: VARConfig) -> int:
    """Parameter count from shapes only (nothing is allocated)."""
    return construct.param_count(lambda: VAR(config, rngs=nnx.Rngs(0)))


def weight_decay_mask(model_or_state):
    """The official VAR decay groups (``models.decay``, the rule every optimiser uses)."""
    return decay.weight_decay_mask(model_or_state)


# The blocks' weight matrices, by leaf name: axes (after any leading layer axis) that a token's
# features enter and leave by. qkv's axis 1 (q, k, v) and ada_lin's six chunks are kept apart or
# together as the orthogonalised update should see them: q, k and v are three matrices (the axis
# between input and output is a batch axis), the AdaLN chunks one (C, 6C) matrix.
_MATRIX_AXES = {"qkv_kernel": ((0,), (2, 3)), "kernel": ((0,), (1,))}
_ADA_LIN_AXES = ((0,), (1, 2))


def matrix_axes(path, shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(input axes, output axes) of a block's weight matrix at `path` (a parameter path of the
    Param state, either layout) with `shape`, or None for every other parameter (embeddings,
    head, biases, norms). The optimiser's rule for Muon (`train.optim.make_muon_optimizer`):
    the hidden layers' matrices are orthogonalised, the rest go to Adam, as Muon's authors do.
    Axes count from the leaf's first axis, so a stacked layer axis stays a batch axis."""
    names = decay.path_names(path)
    if "blocks" not in names or names[-1] not in _MATRIX_AXES:
        return None
    stacked = decay.stacked_layer_axis(path)
    axes = _ADA_LIN_AXES if "ada_lin" in names else _MATRIX_AXES[names[-1]]
    expected_ndim = 1 + max(axes[1]) + int(stacked)
    if len(shape) != expected_ndim:
        raise ValueError(f"matrix_axes: {'.'.join(map(str, names))} has shape {tuple(shape)}, "
                         f"expected {expected_ndim} axes ({'stacked' if stacked else 'looped'} "
                         f"layout)")
    shift = int(stacked)
    return tuple(a + shift for a in axes[0]), tuple(a + shift for a in axes[1])
