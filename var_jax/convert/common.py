"""Strict conversion between PyTorch state dicts and Flax NNX parameters.

Official checkpoints are plain ``state_dict``s (``name -> tensor``). Loading one must be as strict
as ``torch.nn.Module.load_state_dict(strict=True)``: every key that the model needs present, no
unknown key, every shape right, each problem reported with its key. A silently skipped key is a
model that runs and produces garbage, which is the failure this module exists to prevent.

A conversion is a list of :class:`Rule` (one torch key -> one NNX parameter path, with the
layout transform between them). :func:`rules_from_model` derives the rules for models whose
attribute names mirror the torch module names (``encoder.down.0.block.1.conv1.weight`` ->
``encoder.down[0].block[1].conv1.kernel``); models with other layouts (split or fused weights)
add or replace rules by hand. torch is imported lazily, only to read ``.pth`` files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple  # an NNX parameter path, e.g. ("encoder", "down", 0, "block", 1, "conv1", "kernel")


# ----------------------------------------------------------------------------------------------
# Layout transforms (torch -> Flax and back).

def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_to_dense(w_OxI: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.swapaxes(w_OxI, 0, 1)


def dense_to_linear(k_IxO: np.ndarray) -> np.ndarray:
    return np.swapaxes(k_IxO, 0, 1)


def conv_to_flax(w_OxIxHxW: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return np.transpose(w_OxIxHxW, (2, 3, 1, 0))


def flax_to_conv(k_HxWxIxO: np.ndarray) -> np.ndarray:
    return np.transpose(k_HxWxIxO, (3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One torch key feeds one NNX parameter, through ``to_flax`` (inverse: ``to_torch``)."""

    torch_key: str
    path: Path
    to_flax: Callable[[np.ndarray], np.ndarray] = identity
    to_torch: Callable[[np.ndarray], np.ndarray] = identity


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files.

def _to_numpy(name: str, value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy dtype, go through float32
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    raise ValueError(f"state dict entry {name!r} is a {type(value).__name__}, expected an array "
                     "or a tensor: this is not a plain state_dict")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict (``name -> np.ndarray``) from ``.npz`` or torch ``.pth``/``.pt``/``.bin``.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (no code runs from the file);
    torch is needed only for them. A file holding ``{"model": state_dict}`` or
    ``{"state_dict": ...}`` (a trainer checkpoint) is unwrapped. Truncated or foreign files raise
    ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: np.asarray(data[name]) for name in data.files}
        except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError, OSError ...
            raise ValueError(f"could not read {path!r} as a .npz state dict (truncated or not a "
                             f"numpy archive?): {type(err).__name__}: {err}") from err
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError as err:
            raise ValueError(f"reading {path!r} needs torch (pip install 'var_jax[torch]'), or "
                             "convert it to .npz once where torch is available") from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"could not read {path!r} as a torch state dict (truncated, or not "
                             f"a weights-only checkpoint?): {type(err).__name__}: {err}") from err
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a state_dict "
                             "(a mapping from parameter names to tensors)")
        return {str(name): _to_numpy(name, value) for name, value in obj.items()}
    raise ValueError(f"unknown checkpoint format {suffix!r} for {path!r}: expected .npz, .pth, "
                     ".pt, .bin or .ckpt")


# ----------------------------------------------------------------------------------------------
# Rules from the model's structure.

def _child(obj, name):
    return obj[name] if isinstance(name, int) else getattr(obj, name)


def get_at_path(model: nnx.Module, path: Path):
    """The object at ``path`` (attribute names and list indices) inside ``model``."""
    obj = model
    for name in path:
        obj = _child(obj, name)
    return obj


def param_paths(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """Every ``nnx.Param`` of ``model``: path -> shape (from ``nnx.state``, no copies)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(path): tuple(var.shape) for path, var in flat}


def default_rule(model: nnx.Module, path: Path) -> Rule:
    """The torch key and transform for a parameter whose module names mirror torch's.

    Conv kernels are transposed as Conv2d weights, Linear kernels as Linear weights, norm scales
    and embedding tables are torch ``weight``s; any other parameter keeps its name and layout.
    """
    *owner_path, leaf = path
    owner = get_at_path(model, tuple(owner_path))
    prefix = ".".join(str(p) for p in owner_path)
    key = lambda name: f"{prefix}.{name}" if prefix else name
    if leaf == "kernel" and isinstance(owner, nnx.Conv):
        return Rule(key("weight"), path, conv_to_flax, flax_to_conv)
    if leaf == "kernel" and isinstance(owner, nnx.Linear):
        return Rule(key("weight"), path, linear_to_dense, dense_to_linear)
    if leaf == "scale" and isinstance(owner, (nnx.GroupNorm, nnx.LayerNorm, nnx.RMSNorm)):
        return Rule(key("weight"), path)
    if leaf == "embedding" and isinstance(owner, nnx.Embed):
        return Rule(key("weight"), path)
    return Rule(key(str(leaf)), path)


def rules_from_model(model: nnx.Module, overrides: Mapping[Path, Rule] | None = None
                     ) -> list[Rule]:
    """One rule per parameter of ``model`` (:func:`default_rule` unless ``overrides`` has it)."""
    overrides = dict(overrides or {})
    rules = [overrides.pop(path, None) or default_rule(model, path)
             for path in param_paths(model)]
    if overrides:
        raise ValueError(f"override rules for paths that are not parameters of the model: "
                         f"{sorted(overrides)}")
    return rules


# ----------------------------------------------------------------------------------------------
# Checking and applying.

def _list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def convert_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray],
                       rules: list[Rule], *, ignore: Iterable[str] = (),
                       what: str = "state dict") -> dict[Path, np.ndarray]:
    """Checks ``state_dict`` against ``rules`` and returns ``path -> converted array``.

    Raises ValueError listing every missing key, unexpected key (not in a rule and not in
    ``ignore``) and wrong shape (with the torch shape the model needs), and if the rules leave a
    model parameter unset. Nothing is written to the model.
    """
    return convert_arrays(state_dict, rules, param_paths(model), ignore=ignore, what=what,
                          owner=type(model).__name__)


def convert_arrays(state_dict: Mapping[str, np.ndarray], rules: list[Rule],
                   shapes: Mapping[Path, tuple[int, ...]], *, ignore: Iterable[str] = (),
                   what: str = "state dict", owner: str = "the model") -> dict[Path, np.ndarray]:
    """The strict check of every loader (official state dicts and converted directories alike):
    ``state_dict`` (name -> array) through ``rules`` onto parameters of the given ``shapes``
    (path -> shape). Returns ``path -> converted array``; raises ValueError naming every
    missing, unexpected or mis-shaped entry."""
    ignore = set(ignore)
    shapes = {tuple(path): tuple(shape) for path, shape in shapes.items()}
    problems = []
    rule_keys = {rule.torch_key for rule in rules}
    missing = rule_keys - set(state_dict)
    unexpected = set(state_dict) - rule_keys - ignore
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    unset = set(shapes) - {rule.path for rule in rules}
    if unset:
        problems.append("model parameters that no rule sets: "
                        f"{_list('.'.join(map(str, p)) for p in unset)}")
    out = {}
    for rule in rules:
        if rule.torch_key not in state_dict:
            continue
        if rule.path not in shapes:
            problems.append(f"rule for {rule.torch_key!r} targets {rule.path}, which is not a "
                            "parameter of the model")
            continue
        value = np.asarray(state_dict[rule.torch_key])
        converted = rule.to_flax(value)
        if tuple(converted.shape) != shapes[rule.path]:
            # Shape the torch tensor should have had: push a zero-cost view of the model's shape
            # through the inverse transform.
            want = rule.to_torch(np.broadcast_to(np.zeros((), value.dtype), shapes[rule.path]))
            problems.append(f"wrong shape for {rule.torch_key!r}: got {tuple(value.shape)}, the "
                            f"model needs {tuple(want.shape)}")
            continue
        if not np.issubdtype(converted.dtype, np.floating):
            problems.append(f"{rule.torch_key!r} has dtype {converted.dtype}, expected floats")
            continue
        out[rule.path] = converted
    if problems:
        raise ValueError(f"cannot load {what} into {owner}: " + "; ".join(problems))
    return out


def assign_params(model: nnx.Module, arrays: Mapping[Path, np.ndarray]) -> nnx.Module:
    """Overwrites the parameters at the given paths in place, keeping the model's dtypes (a
    float16 checkpoint loads into a float32 model). Call after a strict check."""
    for path, value in arrays.items():
        param = get_at_path(model, path)
        param.set_value(jnp.asarray(value, dtype=param.dtype))
    return model


def load_into_model(model: nnx.Module, state_dict: Mapping[str, np.ndarray], rules: list[Rule],
                    *, ignore: Iterable[str] = (), what: str = "state dict") -> nnx.Module:
    """Checks (see :func:`convert_state_dict`), then overwrites the model's parameters in place."""
    return assign_params(model, convert_state_dict(model, state_dict, rules, ignore=ignore,
                                                   what=what))


def param_arrays(model: nnx.Module) -> dict[Path, np.ndarray]:
    """Every parameter of ``model`` as path -> np.ndarray."""
    return {tuple(path): np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def export_state_dict(model: nnx.Module | Mapping[Path, np.ndarray], rules: list[Rule]
                      ) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_into_model`: ``torch name -> np.ndarray`` in torch layout,
    from a model or from its parameters as path -> array."""
    arrays = model if isinstance(model, Mapping) else None
    out = {}
    for rule in rules:
        value = (np.asarray(arrays[rule.path]) if arrays is not None
                 else np.asarray(get_at_path(model, rule.path)[...]))
        out[rule.torch_key] = np.ascontiguousarray(rule.to_torch(value))
    return out
