"""Official VQ-VAE state dict (``vae_ch160v4096z32.pth`` layout) <-> :class:`VQVAE` parameters.

The NNX model's attribute names mirror the torch modules, so every key follows the default rule
of :mod:`var_jax.convert.common`; only the codebook (a bare ``nnx.Param`` here, an
``nn.Embedding`` in torch) is named by hand. The usage buffer ``quantize.ema_vocab_hit_SV`` is a
training statistic, not a parameter, and is dropped.
"""

from __future__ import annotations

import os

import numpy as np

from var_jax.convert import common

IGNORED_KEYS = ("quantize.ema_vocab_hit_SV",)


def vqvae_rules(model) -> list[common.Rule]:
    """The torch key of every parameter of ``model`` (a :class:`var_jax.models.vqvae.VQVAE`)."""
    codebook = ("quantize", "embedding")
    return common.rules_from_model(
        model, overrides={codebook: common.Rule("quantize.embedding.weight", codebook)})


def load_vqvae_state_dict(model, state_dict):
    """Loads an official VQ-VAE state dict (a mapping, or a .pth/.npz path) into ``model``.

    Strict: missing, unexpected or mis-shaped keys raise ValueError naming them. Returns model.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = common.load_state_dict_file(state_dict)
    return common.load_into_model(model, state_dict, vqvae_rules(model),
                                  ignore=IGNORED_KEYS, what="VQ-VAE state dict")


def vqvae_state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters as an official-layout state dict (without the usage buffer)."""
    return common.export_state_dict(model, vqvae_rules(model))


def vqvae_from_state_dict(config, state_dict):
    """A :class:`VQVAE` built from a state dict (mapping or path) without random initialisation.

    The model is traced abstractly (``construct.shape_model``) and every parameter is then set
    from the checkpoint, which the strict loader guarantees; on CPU this skips compiling one random
    initialiser per parameter shape.
    """
    from flax import nnx

    from var_jax.models import construct
    from var_jax.models.vqvae import VQVAE

    model = construct.shape_model(lambda: VQVAE(config, rngs=nnx.Rngs(0)))
    return load_vqvae_state_dict(model, state_dict)


def vqvae_config_from_state_dict(state_dict, patch_nums=None, **changes):
    """The :class:`VQVAEConfig` whose shapes a state dict has (widths, depth, attention, Phi).

    ``patch_nums`` (default: the released 256px schedule) fixes the image side: 2 ** (levels -
    1) * patch_nums[-1]. Raises ValueError if the keys do not look like an official VQ-VAE.
    """
    from var_jax import scales
    from var_jax.models.vqvae import VQVAEConfig

    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = common.load_state_dict_file(state_dict)
    try:
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in state_dict
                         if k.startswith("encoder.down."))
        widths = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                  for i in range(levels)]
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state_dict
                                 if k.startswith("encoder.down.0.block."))
        vocab_size, z_channels = state_dict["quantize.embedding.weight"].shape
        num_phi = sum(1 for k in state_dict
                      if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight"))
        kernel = state_dict["quant_conv.weight"].shape[-1]
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError("the state dict does not look like an official VQ-VAE (expected keys "
                         f"such as 'encoder.conv_in.weight'): {err!r}") from err
    patch_nums = scales.validate_schedule(patch_nums or scales.SCHEDULES["256"])
    values = dict(
        ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
        use_attn=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state_dict,
        use_mid_attn="encoder.mid.attn_1.qkv.weight" in state_dict,
        z_channels=z_channels, vocab_size=vocab_size, num_phi=max(num_phi, 1),
        phi_ratio=0.5 if num_phi else 0.0, quant_conv_kernel=kernel, patch_nums=patch_nums,
        image_size=2 ** (levels - 1) * patch_nums[-1])
    values.update(changes)
    return VQVAEConfig(**values)
