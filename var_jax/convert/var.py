"""Official VAR state dict (``var_d{16,20,24,30,36}.pth`` layout) <-> :class:`VAR` parameters.

The official tensors map one to one onto the NNX parameters, up to a transpose and a reshape:
``mat_qkv`` (3C, C) -> ``qkv_kernel`` (C, 3, H, D) (q | k | v, head-major), each ``ada_lin.1``
(nC, C) -> ``kernel`` (C, n, C) in the official chunk order, the (1, 1, ...) leading axes of
``pos_start`` / ``pos_1LC`` / ``ada_gss`` / ``scale_mul_1H11`` dropped. Shapes are checked on the
torch side *before* any reshape, since a transposed matrix has the size of the right one and would
otherwise reshape silently into garbage. The buffers (``lvl_1L``, ``attn_bias_for_masking``,
``*.zero_k_bias``) are recomputed by the model and dropped here; :func:`var_state_dict` writes
them back so that an exported dict loads into the official code with ``strict=True``.

:func:`infer_config` reads depth, width, heads, schedule, vocabulary, latent channels, classes
and shared AdaLN from the shapes, so a checkpoint needs no side file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from var_jax import scales
from var_jax.convert import common


def buffer_keys(depth: int) -> tuple[str, ...]:
    return ("lvl_1L", "attn_bias_for_masking") + tuple(
        f"blocks.{i}.attn.zero_k_bias" for i in range(depth))


def _linear(torch_key, path, n_out, n_in, out_shape=None):
    """A torch Linear weight (n_out, n_in) -> kernel (n_in, *out_shape)."""
    out_shape = tuple(out_shape or (n_out,))
    return common.Rule(
        torch_key, path,
        lambda w: np.swapaxes(w, 0, 1).reshape((n_in,) + out_shape),
        lambda k: np.swapaxes(k.reshape(n_in, n_out), 0, 1)), (n_out, n_in)


def _reshaped(torch_key, path, torch_shape, flax_shape):
    torch_shape, flax_shape = tuple(torch_shape), tuple(flax_shape)
    return common.Rule(torch_key, path, lambda w: w.reshape(flax_shape),
                       lambda k: k.reshape(torch_shape)), torch_shape


def var_rules(config) -> list[tuple[common.Rule, tuple[int, ...]]]:
    """(rule, torch shape) for every parameter of ``VAR(config)``."""
    c, h, d = config.width, config.num_heads, config.head_dim
    hidden, seq_len = config.hidden, config.seq_len
    rules = [
        _reshaped("class_emb.weight", ("class_emb", "embedding"), (config.num_classes + 1, c),
                  (config.num_classes + 1, c)),
        _linear("word_embed.weight", ("word_embed", "kernel"), c, config.cvae),
        _reshaped("word_embed.bias", ("word_embed", "bias"), (c,), (c,)),
        _reshaped("pos_start", ("pos_start",), (1, 1, c), (1, c)),
        _reshaped("pos_1LC", ("pos_1LC",), (1, seq_len, c), (seq_len, c)),
        _reshaped("lvl_embed.weight", ("lvl_embed", "embedding"), (config.num_scales, c),
                  (config.num_scales, c)),
        _linear("head_nm.ada_lin.1.weight", ("head_nm", "ada_lin", "kernel"), 2 * c, c, (2, c)),
        _reshaped("head_nm.ada_lin.1.bias", ("head_nm", "ada_lin", "bias"), (2 * c,), (2, c)),
        _linear("head.weight", ("head", "kernel"), config.vocab_size, c),
        _reshaped("head.bias", ("head", "bias"), (config.vocab_size,), (config.vocab_size,)),
    ]
    if config.shared_aln:
        rules += [
            _linear("shared_ada_lin.1.weight", ("shared_ada_lin", "kernel"), 6 * c, c, (6, c)),
            _reshaped("shared_ada_lin.1.bias", ("shared_ada_lin", "bias"), (6 * c,), (6, c)),
        ]
    for i in range(config.depth):
        t, p = f"blocks.{i}.", ("blocks", i)
        rules += [
            _linear(t + "attn.mat_qkv.weight", p + ("attn", "qkv_kernel"), 3 * c, c, (3, h, d)),
            _reshaped(t + "attn.q_bias", p + ("attn", "q_bias"), (c,), (h, d)),
            _reshaped(t + "attn.v_bias", p + ("attn", "v_bias"), (c,), (h, d)),
            _reshaped(t + "attn.scale_mul_1H11", p + ("attn", "scale_mul"), (1, h, 1, 1), (h,)),
            _linear(t + "attn.proj.weight", p + ("attn", "proj", "kernel"), c, c),
            _reshaped(t + "attn.proj.bias", p + ("attn", "proj", "bias"), (c,), (c,)),
            _linear(t + "ffn.fc1.weight", p + ("ffn", "fc1", "kernel"), hidden, c),
            _reshaped(t + "ffn.fc1.bias", p + ("ffn", "fc1", "bias"), (hidden,), (hidden,)),
            _linear(t + "ffn.fc2.weight", p + ("ffn", "fc2", "kernel"), c, hidden),
            _reshaped(t + "ffn.fc2.bias", p + ("ffn", "fc2", "bias"), (c,), (c,)),
        ]
        if config.shared_aln:
            rules.append(_reshaped(t + "ada_gss", p + ("ada_gss",), (1, 1, 6, c), (6, c)))
        else:
            rules += [
                _linear(t + "ada_lin.1.weight", p + ("ada_lin", "kernel"), 6 * c, c, (6, c)),
                _reshaped(t + "ada_lin.1.bias", p + ("ada_lin", "bias"), (6 * c,), (6, c)),
            ]
    return rules


def _names(keys, limit=12):
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(config, state_dict: Mapping[str, np.ndarray]) -> None:
    """Raises ValueError listing missing keys, unexpected keys and wrong (torch) shapes."""
    rules = var_rules(config)
    wanted = {rule.torch_key: shape for rule, shape in rules}
    problems = []
    missing = set(wanted) - set(state_dict)
    unexpected = set(state_dict) - set(wanted) - set(buffer_keys(config.depth))
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    wrong = [f"{key!r} has shape {tuple(np.shape(state_dict[key]))}, expected {shape}"
             for key, shape in wanted.items()
             if key in state_dict and tuple(np.shape(state_dict[key])) != shape]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:12])
                        + (f"; ... ({len(wrong)} in all)" if len(wrong) > 12 else ""))
    if problems:
        raise ValueError("VAR state dict does not fit the model (depth "
                         f"{config.depth}, width {config.width}, patch_nums "
                         f"{config.patch_nums}): " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The two layouts of the blocks: stacked along a leading layer axis under ("blocks", ...) (the
# scanned model) or one block per index under ("blocks", i, ...) (the looped model and the
# official checkpoints). Conversions speak the looped layout; these move between the two.

def _is_looped(path) -> bool:
    return len(path) > 1 and path[0] == "blocks" and isinstance(path[1], int)


def stack_layers(flat: Mapping[tuple, np.ndarray], depth: int) -> dict[tuple, np.ndarray]:
    """path -> array in the looped layout -> the stacked layout (``depth`` layers)."""
    out, per_layer = {}, {}
    for path, value in flat.items():
        if _is_looped(path):
            per_layer.setdefault(tuple(path[2:]), {})[path[1]] = value
        else:
            out[tuple(path)] = value
    for rest, layers in per_layer.items():
        if sorted(layers) != list(range(depth)):
            raise ValueError(f"blocks.*.{'.'.join(map(str, rest))}: found layers "
                             f"{sorted(layers)}, expected 0..{depth - 1}")
        out[("blocks",) + rest] = np.stack([np.asarray(layers[i]) for i in range(depth)])
    return out


def unstack_layers(flat: Mapping[tuple, np.ndarray], depth: int, *,
                   take=lambda value, i: value[i]) -> dict[tuple, np.ndarray]:
    """path -> array in the stacked layout -> the looped layout (already looped: unchanged).
    ``take(value, i)`` picks layer i (default: index the leading axis)."""
    out = {}
    for path, value in flat.items():
        path = tuple(path)
        if path[0] == "blocks" and not _is_looped(path):
            for i in range(depth):
                out[("blocks", i) + path[1:]] = take(value, i)
        else:
            out[path] = value
    return out


def _looped_shapes(model) -> dict[tuple, tuple[int, ...]]:
    """The parameter shapes ``model`` has in the looped layout, whichever layout it has."""
    return unstack_layers(common.param_paths(model), model.config.depth,
                          take=lambda shape, _: tuple(shape[1:]))


def assign_looped(model, arrays: Mapping[tuple, np.ndarray]):
    """Writes parameters given in the looped layout into ``model`` (either layout)."""
    if model.config.scan_layers:
        arrays = stack_layers(arrays, model.config.depth)
    return common.assign_params(model, arrays)


def looped_params(model) -> dict[tuple, np.ndarray]:
    """``model``'s parameters as path -> np.ndarray in the looped layout (either layout)."""
    arrays = common.param_arrays(model)
    return unstack_layers(arrays, model.config.depth) if model.config.scan_layers else arrays


def relayout(model, scan_layers: bool):
    """The same VAR (same parameters, same function) in the other layout of its blocks."""
    from flax import nnx

    from var_jax.models import construct
    from var_jax.models.var import VAR

    config = dataclasses.replace(model.config, scan_layers=bool(scan_layers))
    if config == model.config:
        return model
    other = construct.abstract_model(lambda: VAR(config, rngs=nnx.Rngs(0)))
    return assign_looped(other, looped_params(model))


# ----------------------------------------------------------------------------------------------
# Loading and exporting official state dicts.

def load_var_state_dict(model, state_dict):
    """Loads an official VAR state dict (a mapping, or a .pth/.npz path) into ``model`` (either
    layout: the scanned model gets every ``blocks.{i}.*`` stacked along its layer axis).

    Strict: every missing, unexpected or mis-shaped key is named in the ValueError. Returns model.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = common.load_state_dict_file(state_dict)
    check_state_dict(model.config, state_dict)
    rules = [rule for rule, _ in var_rules(model.config)]
    converted = common.convert_arrays(state_dict, rules, _looped_shapes(model),
                                      ignore=buffer_keys(model.config.depth),
                                      what="VAR state dict", owner="VAR")
    return assign_looped(model, converted)


def var_state_dict(model, *, include_buffers: bool = True) -> dict[str, np.ndarray]:
    """The model's parameters in the official layout (either model layout); with the buffers
    the official VAR needs for ``load_state_dict(strict=True)``."""
    config = model.config
    out = common.export_state_dict(looped_params(model),
                                   [rule for rule, _ in var_rules(config)])
    if include_buffers:
        levels = scales.token_layout(config.patch_nums).level_ids.astype(np.int64)
        out["lvl_1L"] = levels[None]
        bias = np.where(levels[:, None] >= levels[None, :], 0.0, -np.inf).astype(np.float32)
        out["attn_bias_for_masking"] = bias[None, None]
        for i in range(config.depth):
            out[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((config.width,), np.float32)
    return out


def _shape(state_dict, key, ndim):
    if key not in state_dict:
        raise ValueError(f"cannot infer the VAR configuration: key {key!r} is missing (is this "
                         "a VAR state dict?)")
    shape = tuple(np.shape(state_dict[key]))
    if len(shape) != ndim:
        raise ValueError(f"cannot infer the VAR configuration: {key!r} has shape {shape}, "
                         f"expected {ndim} dimensions")
    return shape


def infer_schedule(seq_len: int, num_scales: int) -> tuple[int, ...]:
    """The released schedule with ``num_scales`` scales and ``seq_len`` tokens."""
    for sides in scales.SCHEDULES.values():
        layout = scales.token_layout(sides)
        if layout.seq_len == seq_len and layout.num_scales == num_scales:
            return sides
    known = {name: scales.token_layout(sides).seq_len
             for name, sides in scales.SCHEDULES.items()}
    raise ValueError(f"no known schedule has {num_scales} scales and L = {seq_len} tokens "
                     f"(known schedules and their L: {known}); pass patch_nums explicitly")


def infer_depth(state_dict: Mapping[str, np.ndarray]) -> int:
    """The number of blocks: 1 + the last index whose block is (at least half) there.

    A block is counted by how many of its keys are present, not by the largest index seen, so
    a stray or misspelled ``blocks.9.*`` key beside a depth-2 model leaves the depth at 2 and
    is reported as the one unexpected key, while a block that lost a key still counts and
    the key is reported as missing.
    """
    per_block: dict[int, int] = {}
    for key in state_dict:
        if (m := re.match(r"blocks\.(\d+)\.", key)):
            per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + 1
    if not per_block:
        raise ValueError("cannot infer the VAR configuration: the state dict has no "
                         "'blocks.{i}.*' keys (is this a VAR state dict?)")
    full = max(per_block.values())
    return 1 + max(i for i, count in per_block.items() if 2 * count >= full)


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides):
    """A VARConfig read off the shapes of an official state dict (overrides win)."""
    from var_jax.models.var import VARConfig

    depth = infer_depth(state_dict)
    _, _, width = _shape(state_dict, "pos_start", 3)
    _, seq_len, _ = _shape(state_dict, "pos_1LC", 3)
    num_scales, _ = _shape(state_dict, "lvl_embed.weight", 2)
    _, heads, _, _ = _shape(state_dict, "blocks.0.attn.scale_mul_1H11", 4)
    vocab, _ = _shape(state_dict, "head.weight", 2)
    _, cvae = _shape(state_dict, "word_embed.weight", 2)
    classes, _ = _shape(state_dict, "class_emb.weight", 2)
    hidden, _ = _shape(state_dict, "blocks.0.ffn.fc1.weight", 2)
    fields = dict(depth=depth, width=width, num_heads=heads, vocab_size=vocab, cvae=cvae,
                  num_classes=classes - 1, mlp_ratio=hidden / width,
                  shared_aln="shared_ada_lin.1.weight" in state_dict)
    fields.update(overrides)
    if "patch_nums" not in fields:
        fields["patch_nums"] = infer_schedule(seq_len, num_scales)
    return VARConfig(**fields)


_COMPARED = ("depth", "width", "num_heads", "patch_nums", "vocab_size", "cvae", "num_classes",
             "mlp_ratio", "shared_aln")


def check_config(config, state_dict: Mapping[str, np.ndarray]) -> None:
    """Raises ValueError naming every architecture field where ``state_dict`` differs from
    ``config`` (another depth, schedule, vocabulary ...)."""
    found = infer_config(state_dict, patch_nums=config.patch_nums)
    diffs = [f"{name}: the model has {getattr(config, name)!r}, the checkpoint "
             f"{getattr(found, name)!r}" for name in _COMPARED
             if getattr(config, name) != getattr(found, name)]
    _, seq_len, _ = _shape(state_dict, "pos_1LC", 3)
    num_scales, _ = _shape(state_dict, "lvl_embed.weight", 2)
    if (seq_len, num_scales) != (config.seq_len, config.num_scales):
        diffs.append(f"schedule: the model has patch_nums {config.patch_nums} "
                     f"({config.num_scales} scales, L = {config.seq_len}), the checkpoint "
                     f"{num_scales} scales, L = {seq_len}")
    if diffs:
        raise ValueError("VAR checkpoint does not match the configuration: " + "; ".join(diffs))
