"""Conversion of official PyTorch checkpoints (plain state dicts) into var_jax NNX models.

``common`` holds the strict, generic machinery (file reading, key/shape checks, layout
transforms); ``vqvae`` (and ``var``) the per-model key maps. torch is only imported to read
``.pth`` files.
"""

from var_jax.convert.common import (
    Rule,
    convert_state_dict,
    export_state_dict,
    load_into_model,
    load_state_dict_file,
    rules_from_model,
)

__all__ = ["Rule", "convert_state_dict", "export_state_dict", "load_into_model",
           "load_state_dict_file", "rules_from_model"]
