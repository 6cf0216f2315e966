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
