"""The multi-scale VQ-VAE tokenizer of VAR (Flax NNX, NHWC, images in [-1, 1]).

The architecture is the official one (LDM/taming ``vq-f16`` encoder and decoder, a 3x3
``quant_conv`` / ``post_quant_conv`` around a multi-scale residual quantizer with 4 partially
shared Phi convs), so the released ``vae_ch160v4096z32.pth`` loads with
:func:`var_jax.convert.vqvae.load_vqvae_state_dict`. Attribute names mirror the torch module
names (``encoder.down[4].attn[1].qkv``) so that the checkpoint keys map one-to-one.

The modules only hold parameters; the quantizer maths are the pure functions of
:mod:`var_jax.quantizer`, called with ``self.phi`` and the codebook.

Deviations from torch, on purpose: no dropout (the released config has 0.0), and parameter
initialisation uses Flax defaults (the official weights are loaded, not re-initialised).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import attention, checks, quantizer, scales
from var_jax.models import construct


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Hyperparameters of the tokenizer (defaults: the released 256px model)."""

    image_size: int = 256
    in_channels: int = 3
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more (official code)
    use_attn: bool = True  # one attention block after each res-block of the lowest-res level
    use_mid_attn: bool = True  # attention in the middle blocks
    z_channels: int = 32  # Cvae
    vocab_size: int = 4096
    patch_nums: tuple[int, ...] = scales.SCHEDULES["256"]
    beta: float = 0.25  # commitment weight of the VQ loss
    phi_ratio: float = 0.5  # Phi(h) = (1 - r) h + r conv(h); 0 turns Phi off
    num_phi: int = 4  # partially shared Phi convs (official: 4)
    quant_conv_kernel: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    codebook_init_std: float = 1.0  # normal init; unit scale like the encoder's outputs at init
    # Matmul/conv precision. "highest" keeps float32 on GPUs/TPUs, where the default (TF32 /
    # bf16 passes) flips tokens against the official float32 model; None for the faster default.
    precision: str | None = "highest"
    # The decoder's attention blocks (mid block and lowest-res level, over all n^2 latent
    # positions: an n^4 term of generation) can use a low-rank backend of `var_jax.attention`
    # ("poly", "favor", "auto" with logit_bound, ...); "exact" is the official computation.
    decoder_attn_backend: str = "exact"
    decoder_attn_options: tuple = ()
    decoder_attn_seed: int = 0  # favor's random features

    def __post_init__(self):
        # Accept lists (ml_collections, JSON) and normalise to tuples so the config hashes.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", scales.validate_schedule(self.patch_nums))
        opts = self.decoder_attn_options
        opts = tuple(sorted(opts.items())) if isinstance(opts, Mapping) else tuple(
            tuple(kv) for kv in opts)
        object.__setattr__(self, "decoder_attn_options", opts)
        try:
            attention.check_backend_options(self.decoder_attn_backend, opts)
        except ValueError as err:
            raise ValueError(f"VQVAEConfig.decoder_attn_backend / decoder_attn_options: {err}"
                             ) from err
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "z_channels",
                     "vocab_size", "num_phi", "quant_conv_kernel", "norm_groups"):
            checks.positive_int(f"VQVAEConfig.{name}", getattr(self, name))
        if not self.ch_mult:
            raise ValueError("VQVAEConfig.ch_mult must be a non-empty tuple of positive ints")
        for i, mult in enumerate(self.ch_mult):
            checks.positive_int(f"VQVAEConfig.ch_mult[{i}]", mult)
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(f"VQVAEConfig: every width ch * ch_mult must be divisible by "
                                 f"norm_groups={self.norm_groups}, got {self.ch} * {mult}")
        if self.precision is not None:
            try:
                jax.lax.Precision(self.precision)
            except ValueError as err:
                raise ValueError("VQVAEConfig.precision must be None or a jax.lax.Precision "
                                 f"name ('highest', 'high', 'default'), got {self.precision!r}"
                                 ) from err
        if self.quant_conv_kernel % 2 == 0:
            raise ValueError("VQVAEConfig.quant_conv_kernel must be odd, got "
                             f"{self.quant_conv_kernel}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"VQVAEConfig.image_size={self.image_size} is not divisible by the "
                             f"downsampling factor {self.downsample_factor} (2 ** (len(ch_mult) - "
                             "1))")
        if self.patch_nums[-1] != self.latent_size:
            raise ValueError(f"VQVAEConfig.patch_nums must end at the latent side "
                             f"{self.latent_size} (image_size {self.image_size} / "
                             f"{self.downsample_factor}), got {self.patch_nums}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    def replace(self, **changes) -> VQVAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values) -> VQVAEConfig:
        return cls(**dict(values))

    @classmethod
    def released(cls, patch_nums=scales.SCHEDULES["256"], **changes) -> VQVAEConfig:
        """``vae_ch160v4096z32``; the image side follows the schedule (16 x its last side)."""
        patch_nums = scales.validate_schedule(patch_nums)
        return cls(patch_nums=patch_nums, image_size=16 * patch_nums[-1]).replace(**changes)

    @classmethod
    def tiny(cls, **changes) -> VQVAEConfig:
        """A CPU-sized tokenizer: 32x32 images -> 8x8 latents, scales (1, 2, 3, 4, 6, 8)."""
        return cls(image_size=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16,
                   vocab_size=256, patch_nums=(1, 2, 3, 4, 6, 8)).replace(**changes)

    @classmethod
    def tiny256(cls, **changes) -> VQVAEConfig:
        """The official 256px schedule and 16x downsampling at a width CPUs can run."""
        return cls(ch=32, ch_mult=(1, 1, 1, 2, 2), num_res_blocks=1, use_attn=False,
                   z_channels=32, vocab_size=4096).replace(**changes)


# ----------------------------------------------------------------------------------------------
# Layers (LDM/taming encoder-decoder blocks).

def _conv(cin: int, cout: int, kernel: int, cfg: VQVAEConfig, rngs: nnx.Rngs, *,
          stride: int = 1, padding=None) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)) if padding is None else padding,
                    precision=cfg.precision, rngs=rngs)


def _norm(channels: int, cfg: VQVAEConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # torch GroupNorm: biased variance E[(x - mean)^2], eps inside the sqrt.
    return nnx.GroupNorm(channels, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps,
                         use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, cfg, rngs)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = _norm(cout, cfg, rngs)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions, logits scaled by C^-0.5."""

    def __init__(self, channels: int, cfg: VQVAEConfig, *, low_rank: bool = False,
                 rngs: nnx.Rngs):
        self.norm = _norm(channels, cfg, rngs)
        self.qkv = _conv(channels, 3 * channels, 1, cfg, rngs)
        self.proj_out = _conv(channels, channels, 1, cfg, rngs)
        self.precision = cfg.precision
        # Static: (backend, options, seed) when a registered backend replaces the softmax.
        self.backend = ((cfg.decoder_attn_backend, cfg.decoder_attn_options,
                         cfg.decoder_attn_seed)
                        if low_rank and cfg.decoder_attn_backend != "exact" else None)

    def __call__(self, x):
        batch, height, width, channels = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, height * width, 3 * channels)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # torch reshape(B, 3, C, H, W): [q | k | v]
        if self.backend is None:
            logits = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision) * channels ** -0.5
            h = jnp.einsum("bij,bjc->bic", jax.nn.softmax(logits, axis=-1), v,
                           precision=self.precision)
        else:  # one head of width C over all positions, the C^-0.5 folded into q
            name, options, seed = self.backend
            h = attention.full_attention(q[:, :, None] * channels ** -0.5, k[:, :, None],
                                         v[:, :, None], backend=name,
                                         rng=jax.random.key(seed), **dict(options))[:, :, 0]
        return x + self.proj_out(h.reshape(batch, height, width, channels))


class Downsample(nnx.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (the official asymmetric padding)."""

    def __init__(self, channels: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, cfg, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


def _fold_3x3_for_nearest_up2(kernel_3x3xIxO: jax.Array) -> jax.Array:
    """The four 2x2 kernels, one per output phase, of a 3x3 conv applied after nearest x2.

    Along one axis, output row ``2i`` of the 3x3 conv over the upsampled map reads low-res rows
    ``i-1, i, i`` through kernel rows ``0, 1, 2``, and output row ``2i+1`` reads ``i, i, i+1``:
    so phase 0 is the 2-tap kernel ``[w0, w1 + w2]`` over rows ``(i-1, i)`` and phase 1 is
    ``[w0 + w1, w2]`` over rows ``(i, i+1)``. Returns ``(2, 2, I, 4 * O)``, phases ``(a, b)`` in
    row-major order along the output channels.
    """
    def taps(w, axis):
        first, middle, last = (jnp.take(w, i, axis=axis) for i in range(3))
        return (jnp.stack([first, middle + last], axis=axis),
                jnp.stack([first + middle, last], axis=axis))

    phases = [col for row in taps(kernel_3x3xIxO, 0) for col in taps(row, 1)]
    cin, cout = kernel_3x3xIxO.shape[2:]
    return jnp.stack(phases, axis=3).reshape(2, 2, cin, 4 * cout)


def _conv_pad1(x_BxHxWxI, kernel_KxKxIxO, dtype, precision):
    """Stride-1 NHWC conv with zero padding 1 on every side, in ``dtype``."""
    return jax.lax.conv_general_dilated(
        x_BxHxWxI.astype(dtype), kernel_KxKxIxO.astype(dtype), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def _nearest_up2_then_conv3x3(x_BxHxWxI, kernel_3x3xIxO, bias_O, precision):
    """The official form: the upsampled copy, then the 3x3 conv."""
    upsampled = jnp.repeat(jnp.repeat(x_BxHxWxI, 2, axis=1), 2, axis=2)
    dtype = jnp.result_type(upsampled, kernel_3x3xIxO)
    return _conv_pad1(upsampled, kernel_3x3xIxO, dtype, precision) + bias_O.astype(dtype)


def _conv3x3_at_low_resolution(x_BxHxWxI, kernel_3x3xIxO, bias_O, precision):
    batch, height, width, _ = x_BxHxWxI.shape
    cout = kernel_3x3xIxO.shape[-1]
    dtype = jnp.result_type(x_BxHxWxI, kernel_3x3xIxO)
    # Up to four weights summed per tap: in at least float32, rounded once to the compute dtype.
    folded = _fold_3x3_for_nearest_up2(
        kernel_3x3xIxO.astype(jnp.promote_types(kernel_3x3xIxO.dtype, jnp.float32)))
    phases = _conv_pad1(x_BxHxWxI, folded, dtype, precision)
    phases = phases.reshape(batch, height + 1, width + 1, 2, 2, cout)
    rows = [jnp.stack([phases[:, a:a + height, b:b + width, a, b] for b in range(2)], axis=3)
            for a in range(2)]  # each (B, H, W, 2, O): the columns 2j, 2j+1 of output row 2i+a
    out = jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, cout)
    return out + bias_O.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def nearest_up2_conv3x3(x_BxHxWxI: jax.Array, kernel_3x3xIxO: jax.Array, bias_O: jax.Array,
                        precision=None) -> jax.Array:
    """``conv3x3(nearest_upsample_x2(x))`` (zero padding 1) computed at the low resolution.

    The same sums as the official ``Upsample`` with 2.25x fewer multiplications and no
    upsampled copy of the input: one 2x2 conv with the four phases' folded kernels stacked
    along its outputs, over the input padded by one, then each phase's crop interleaved into
    the 2H x 2W map. Phase ``(a, b)`` of output ``(i, j)`` is the 2x2 window whose top-left
    corner is padded position ``(i + a, j + b)``. The decoder's upsampling convs are about a
    fifth of its FLOPs at 256 px; this form halves their time on a CPU.

    The backward pass is the official form's (the same linear map): XLA's derivative of the
    crops and the folded kernel ran 5-6x slower than the whole direct form's on a CPU.
    """
    return _conv3x3_at_low_resolution(x_BxHxWxI, kernel_3x3xIxO, bias_O, precision)


def _nearest_up2_conv3x3_fwd(x, kernel, bias, precision):
    return _conv3x3_at_low_resolution(x, kernel, bias, precision), (x, kernel, bias)


def _nearest_up2_conv3x3_bwd(precision, inputs, cotangent):
    # Only the pullback is used, so XLA drops the direct form's forward computation.
    _, pullback = jax.vjp(
        lambda x, kernel, bias: _nearest_up2_then_conv3x3(x, kernel, bias, precision), *inputs)
    return pullback(cotangent)


nearest_up2_conv3x3.defvjp(_nearest_up2_conv3x3_fwd, _nearest_up2_conv3x3_bwd)


class Upsample(nnx.Module):
    """Nearest x2, then a 3x3 conv (the official module and parameters; computed at low res)."""

    def __init__(self, channels: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, cfg, rngs)

    def __call__(self, x):
        return nearest_up2_conv3x3(x, self.conv.kernel[...], self.conv.bias[...],
                                   self.conv.precision)


class Level(nnx.Module):
    """One resolution level: res-blocks (each optionally followed by attention), then resample."""

    def __init__(self, cin: int, cout: int, num_blocks: int, attn: bool, resample,
                 cfg: VQVAEConfig, *, low_rank: bool = False, rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                               for i in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(cout, cfg, low_rank=low_rank, rngs=rngs)
                              for _ in range(num_blocks)] if attn else [])
        resample_module = resample(cout, cfg, rngs=rngs) if resample is not None else None
        if resample is Downsample:
            self.downsample = resample_module
        elif resample is Upsample:
            self.upsample = resample_module

    def blocks(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Mid(nnx.Module):
    def __init__(self, channels: int, cfg: VQVAEConfig, *, low_rank: bool = False,
                 rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, cfg, rngs=rngs)
        self.attn_1 = (AttnBlock(channels, cfg, low_rank=low_rank, rngs=rngs)
                       if cfg.use_mid_attn else None)
        self.block_2 = ResnetBlock(channels, channels, cfg, rngs=rngs)

    def __call__(self, h):
        h = self.block_1(h)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h)


class Encoder(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, cfg, rngs)
        self.down = nnx.List([
            Level(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks,
                  cfg.use_attn and i == last, Downsample if i != last else None, cfg, rngs=rngs)
            for i in range(len(widths))])
        self.mid = Mid(widths[-1], cfg, rngs=rngs)
        self.norm_out = _norm(widths[-1], cfg, rngs)
        self.conv_out = _conv(widths[-1], cfg.z_channels, 3, cfg, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv(cfg.z_channels, widths[-1], 3, cfg, rngs)
        self.mid = Mid(widths[-1], cfg, low_rank=True, rngs=rngs)
        # up[i] is the level at encoder resolution i (torch fills it with insert(0, ...)); it
        # runs from i = last down to 0 and takes the width of level i + 1 (or the last) as input.
        self.up = nnx.List([
            Level(widths[min(i + 1, last)], widths[i], cfg.num_res_blocks + 1,
                  cfg.use_attn and i == last, Upsample if i != 0 else None, cfg,
                  low_rank=True, rngs=rngs)
            for i in range(len(widths))])
        self.norm_out = _norm(widths[0], cfg, rngs)
        self.conv_out = _conv(widths[0], cfg.in_channels, 3, cfg, rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i].blocks(h)
            if hasattr(self.up[i], "upsample"):
                h = self.up[i].upsample(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class PhiConvs(nnx.Module):
    """The partially shared Phi convs (torch ``quantize.quant_resi.qresi_ls``)."""

    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        count = cfg.num_phi if cfg.phi_ratio else 0
        self.qresi_ls = nnx.List([_conv(cfg.z_channels, cfg.z_channels, 3, cfg, rngs)
                                  for _ in range(count)])


class Quantize(nnx.Module):
    """Parameters of the quantizer: the codebook (a plain ``nnx.Param``) and the Phi convs."""

    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(cfg.codebook_init_std * jax.random.normal(
            rngs.params(), (cfg.vocab_size, cfg.z_channels), jnp.float32))
        self.quant_resi = PhiConvs(cfg, rngs=rngs)


class VQVAEOutput(NamedTuple):
    """The training forward: reconstruction (unclamped) and the quantizer's outputs."""

    reconstruction: jax.Array  # (B, H, W, 3), not clamped (the loss sees the raw decoder output)
    f: jax.Array  # (B, n, n, C) encoder features (after quant_conv)
    f_hat: jax.Array  # (B, n, n, C) straight-through quantised features
    vq_loss: jax.Array  # scalar
    vq_loss_per_scale: jax.Array  # (K,)
    indices: list  # K arrays (B, pn, pn) int32
    hits_KxV: jax.Array  # (K, V) int32 code counts per scale


class VQVAE(nnx.Module):
    """Encoder -> quant_conv -> multi-scale residual quantizer -> post_quant_conv -> decoder."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quantize = Quantize(config, rngs=rngs)
        kernel = config.quant_conv_kernel
        self.quant_conv = _conv(config.z_channels, config.z_channels, kernel, config, rngs)
        self.post_quant_conv = _conv(config.z_channels, config.z_channels, kernel, config, rngs)
        self.phi_index = scales.phi_index_map(len(config.patch_nums), max(config.num_phi, 1))

    # -- parameters -----------------------------------------------------------------------------
    @property
    def codebook(self) -> jax.Array:
        """The (V, C) codebook; overwrite with ``model.quantize.embedding[...] = new``."""
        return self.quantize.embedding[...]

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    def phi(self, scale_index, h_BxnxnxC: jax.Array) -> jax.Array:
        """Phi_k(h) = (1 - r) h + r conv_{map[k]}(h), the scale's partially shared conv.
        ``scale_index``: an int, or a traced one (the conv picked by ``lax.switch``; the
        bucketed sampler's scales share one step)."""
        ratio = self.config.phi_ratio
        if not ratio:
            return h_BxnxnxC
        convs = self.quantize.quant_resi.qresi_ls
        if isinstance(scale_index, (int, np.integer)):
            conved = convs[self.phi_index[scale_index]](h_BxnxnxC)
        else:
            which = jnp.asarray(self.phi_index, jnp.int32)[scale_index]
            conved = jax.lax.switch(which, [lambda h, c=c: c(h) for c in convs], h_BxnxnxC)
        return (1 - ratio) * h_BxnxnxC + ratio * conved

    # -- images <-> features --------------------------------------------------------------------
    def _check_images(self, images):
        cfg = self.config
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"images must be (B, H, W, {cfg.in_channels}) in [-1, 1], got shape "
                             f"{shape}")
        _, height, width, channels = shape
        if channels != cfg.in_channels:
            raise ValueError(f"images must have {cfg.in_channels} channels (NHWC), got shape "
                             f"{tuple(shape)}")
        factor = cfg.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"image sides must be divisible by the downsampling factor {factor}, "
                             f"got {height}x{width}")
        if height // factor != cfg.latent_size or width // factor != cfg.latent_size:
            raise ValueError(f"images must be {cfg.image_size}x{cfg.image_size} (latent "
                             f"{cfg.latent_size}, where patch_nums={cfg.patch_nums} ends), got "
                             f"{height}x{width}")

    def _check_latents(self, f):
        cfg = self.config
        want = (cfg.latent_size, cfg.latent_size, cfg.z_channels)
        shape = getattr(f, "shape", None)
        if shape is None or len(shape) != 4 or tuple(shape[1:]) != want:
            raise ValueError(f"features must be (B, {want[0]}, {want[1]}, {want[2]}), got shape "
                             f"{shape}")

    def encode_features(self, images_BxHxWx3: jax.Array) -> jax.Array:
        """Encoder + quant_conv: (B, H, W, 3) in [-1, 1] -> f (B, n, n, C)."""
        self._check_images(images_BxHxWx3)
        return self.quant_conv(self.encoder(images_BxHxWx3))

    def decode_features(self, f_hat_BxnxnxC: jax.Array) -> jax.Array:
        """post_quant_conv + decoder, clamped to [-1, 1]."""
        self._check_latents(f_hat_BxnxnxC)
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BxnxnxC)), -1.0, 1.0)

    # -- tokens ---------------------------------------------------------------------------------
    def features_to_indices(self, f_BxnxnxC) -> tuple[list[jax.Array], jax.Array]:
        return quantizer.encode(f_BxnxnxC, self.codebook, self.phi, self.patch_nums)

    def images_to_indices(self, images_BxHxWx3) -> list[jax.Array]:
        """Images -> K token maps (B, pn, pn) int32 (``img_to_idxBl``)."""
        indices, _ = self.features_to_indices(self.encode_features(images_BxHxWx3))
        return indices

    def indices_to_fhat(self, indices) -> jax.Array:
        return quantizer.indices_to_fhat(indices, self.codebook, self.phi, self.patch_nums)

    def indices_to_images(self, indices) -> jax.Array:
        """Token maps (any format of :mod:`var_jax.quantizer`) -> images in [-1, 1]."""
        return self.decode_features(self.indices_to_fhat(indices))

    def teacher_forcing_inputs(self, indices) -> jax.Array:
        """(B, L - 1, C): the VAR transformer inputs for scales 1..K-1 (``idxBl_to_var_input``)."""
        return quantizer.teacher_forcing_inputs(indices, self.codebook, self.phi, self.patch_nums)

    def next_scale_input(self, scale_index: int, f_hat_BxnxnxC, h_BxpnxpnxC):
        """One sampling step (see :func:`var_jax.quantizer.next_scale_input`)."""
        return quantizer.next_scale_input(scale_index, f_hat_BxnxnxC, h_BxpnxpnxC, self.phi,
                                          self.patch_nums)

    # -- training -------------------------------------------------------------------------------
    def __call__(self, images_BxHxWx3: jax.Array) -> VQVAEOutput:
        """Training forward: gradients reach the encoder (straight-through), codebook and Phi
        (VQ loss) and decoder (reconstruction)."""
        f = self.encode_features(images_BxHxWx3)
        out = quantizer.quantize(f, self.codebook, self.phi, self.patch_nums,
                                 beta=self.config.beta)
        reconstruction = self.decoder(self.post_quant_conv(out.f_hat))
        return VQVAEOutput(reconstruction, f, out.f_hat, out.vq_loss, out.vq_loss_per_scale,
                           out.indices, out.hits_KxV)


def count_params(config: VQVAEConfig) -> int:
    """Number of parameters of ``VQVAE(config)``, from shapes only (nothing is allocated)."""
    return construct.param_count(lambda: VQVAE(config, rngs=nnx.Rngs(0)))
