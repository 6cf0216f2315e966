"""Official checkpoints in, a ready-to-use pipeline out.

``load_official(vae_path, var_path)`` reads the released ``.pth`` files (torch, an optional extra,
is imported only to read them, with ``weights_only=True``; ``.npz`` exports need no torch),
infers both architectures from the tensor shapes (depth, width, heads, schedule, shared AdaLN;
VQ-VAE width, levels, blocks, attention, codebook), maps every key strictly (missing, unexpected
and mis-shaped keys are named) and returns a :class:`Pipeline`. ``Pipeline.save`` writes a
converted Orbax directory that ``load_converted`` reads back without torch.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import quantizer, sampling
from var_jax.convert import common
from var_jax.convert import var as var_convert
from var_jax.convert import vqvae as vqvae_convert
from var_jax.models import construct
from var_jax.models.var import VAR, VARConfig
from var_jax.models.vqvae import VQVAE, VQVAEConfig

FORMAT = "var_jax.converted/1"


# ----------------------------------------------------------------------------------------------
# Architecture from shapes.

def infer_vqvae_config(state_dict: Mapping[str, np.ndarray], patch_nums, **overrides
                       ) -> VQVAEConfig:
    """The VQ-VAE configuration read off an official state dict; ``patch_nums`` (the VAR's
    schedule) fixes the image size (latent side x downsampling factor)."""
    return vqvae_convert.vqvae_config_from_state_dict(state_dict, tuple(patch_nums), **overrides)


# ----------------------------------------------------------------------------------------------
# The pipeline.

def _jitted(model, method):
    """``method(model, *args)`` as a jitted function of the model's state (split once)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *args: method(nnx.merge(graphdef, st), *args))
    return lambda *args: fn(state, *args)


class Pipeline:
    """A VAR transformer with its VQ-VAE: encode, decode, teacher-forced logits, sampling."""

    def __init__(self, var_model: VAR, vqvae_model: VQVAE, *, scale_buckets: bool = False):
        self.var = var_model
        self.vqvae = vqvae_model
        # Checks the two fit. scale_buckets: see sampling.Sampler.
        self.sampler = sampling.Sampler(var_model, vqvae_model, scale_buckets=scale_buckets)
        self._encode = _jitted(vqvae_model, lambda m, x: m.images_to_indices(x))
        self._decode = _jitted(vqvae_model, lambda m, maps: m.indices_to_images(maps))
        graphdefs_states = nnx.split((var_model, vqvae_model))

        def logits(models, labels, maps):
            var, vae = nnx.merge(graphdefs_states[0], models)
            return var(labels, vae.teacher_forcing_inputs(maps))

        fn = jax.jit(logits)
        self._logits = lambda labels, maps: fn(graphdefs_states[1], labels, maps)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.var.config.patch_nums

    def _maps(self, token_maps):
        return quantizer.as_index_maps(token_maps, self.patch_nums, self.var.config.vocab_size)

    def encode(self, images_BxHxWx3) -> list[jax.Array]:
        """Images in [-1, 1] -> K token maps (B, pn, pn) int32."""
        self.vqvae._check_images(jnp.asarray(images_BxHxWx3))
        return list(self._encode(jnp.asarray(images_BxHxWx3, jnp.float32)))

    def decode(self, token_maps) -> jax.Array:
        """Token maps -> images (B, H, W, 3) in [-1, 1]."""
        return self._decode(self._maps(token_maps))

    def logits(self, labels_B, token_maps) -> jax.Array:
        """Teacher-forced logits (B, L, V) float32, no label dropout."""
        maps = self._maps(token_maps)
        labels = sampling._check_labels(labels_B, self.var.config.num_classes)
        if labels.shape[0] != maps[0].shape[0]:
            raise ValueError(f"labels_B has {labels.shape[0]} labels but the token maps hold "
                             f"{maps[0].shape[0]} images")
        return self._logits(labels, maps)

    def sample_tokens(self, labels_B, *, seed, cfg=1.5, top_k=900, top_p=0.96,
                      more_smooth=False, guidance_power=1.0):
        """-> (token maps, images (B, H, W, 3) in [0, 1])."""
        return self.sampler(labels_B, seed, cfg=cfg, top_k=top_k, top_p=top_p,
                            more_smooth=more_smooth, guidance_power=guidance_power)

    def sample(self, labels_B, *, seed, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
               guidance_power=1.0):
        """Images (B, H, W, 3) in [0, 1]; top_k=0 / top_p=0.0 switch those filters off."""
        return self.sample_tokens(labels_B, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                  more_smooth=more_smooth, guidance_power=guidance_power)[1]

    def edit(self, labels_B, reference_images, keep_mask, *, seed, cfg=3.0, top_k=900,
             top_p=0.95, more_smooth=True):
        """Zero-shot editing of ``reference_images`` ([-1, 1]): keeps them where ``keep_mask``
        is 1, samples the rest for ``labels_B``. -> images in [0, 1]."""
        maps = self.encode(reference_images)
        return sampling.edit(self.var, self.vqvae, labels_B, maps, keep_mask, key=seed, cfg=cfg,
                             top_k=top_k, top_p=top_p, more_smooth=more_smooth)[1]

    # -- converted checkpoints ----------------------------------------------------------------
    def save(self, directory) -> pathlib.Path:
        """Writes ``config.json`` and Orbax checkpoints ``var/`` and ``vqvae/`` (no torch needed
        to read them back with :func:`load_converted`)."""
        import orbax.checkpoint as ocp

        directory = pathlib.Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "var": self.var.config.to_dict(),
                "vqvae": self.vqvae.config.to_dict()}
        (directory / "config.json").write_text(json.dumps(meta, indent=1))
        with ocp.StandardCheckpointer() as ckpt:
            for name, model in (("var", self.var), ("vqvae", self.vqvae)):
                ckpt.save(directory / name, _pure_params(model), force=True)
        return directory


def _pure_params(model):
    """Parameters as a nested dict with string keys (what Orbax stores)."""
    def strkeys(tree):
        if isinstance(tree, Mapping):
            return {str(k): strkeys(v) for k, v in tree.items()}
        return tree
    return strkeys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flatten(tree: Mapping, prefix=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _restore_into(model, flat_arrays: Mapping[tuple, np.ndarray], what: str):
    """Strict (through ``common.convert_arrays``, as every loader): the stored names and
    shapes must be exactly the model's."""
    paths = common.param_paths(model)
    by_name = {".".join(map(str, path)): path for path in paths}
    stored = {".".join(map(str, path)): value for path, value in flat_arrays.items()}
    rules = [common.Rule(name, path) for name, path in by_name.items()]
    converted = common.convert_arrays(stored, rules, paths,
                                      what=f"converted {what} checkpoint",
                                      owner=f"{type(model).__name__} of its config.json")
    return common.assign_params(model, converted)


def _stored_var_fields(meta: Mapping) -> dict:
    fields = dict(meta["var"])
    # Directories written before the layout was recorded hold the looped layout.
    fields.setdefault("scan_layers", False)
    return fields


def load_converted(directory, *, attn_backend=None, attn_options=None, dtype=None,
                   param_dtype=None, scan_layers=None, remat=None) -> Pipeline:
    """Reads a directory written by :meth:`Pipeline.save` (no torch).

    The directory records the layout of the VAR blocks it holds (``scan_layers``); it loads
    into either (``scan_layers``: None keeps the stored one). The other arguments choose how the
    model runs (None: as stored).
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    meta_path = directory / "config.json"
    if not meta_path.is_file():
        raise ValueError(f"{directory} is not a converted var_jax checkpoint: no config.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    stored_cfg = VARConfig.from_dict(_stored_var_fields(meta))
    var_fields = stored_cfg.to_dict()
    for name, value in (("attn_backend", attn_backend), ("attn_options", attn_options),
                        ("dtype", dtype), ("param_dtype", param_dtype),
                        ("scan_layers", scan_layers), ("remat", remat)):
        if value is not None:
            var_fields[name] = value
    var_cfg = VARConfig.from_dict(var_fields)
    vae_cfg = VQVAEConfig.from_dict(meta["vqvae"])
    stored_models = {"var": construct.shape_model(lambda: VAR(stored_cfg, rngs=nnx.Rngs(0))),
                     "vqvae": construct.shape_model(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)))}
    models = {"var": construct.abstract_model(lambda: VAR(var_cfg, rngs=nnx.Rngs(0))),
              "vqvae": construct.abstract_model(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)))}
    with ocp.StandardCheckpointer() as ckpt:
        for name, stored_model in stored_models.items():
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                  _pure_params(stored_model))
            try:
                restored = ckpt.restore(directory / name, target)
            except Exception as err:
                raise ValueError(f"could not restore {directory / name}: "
                                 f"{type(err).__name__}: {err}") from err
            flat = {tuple(int(k) if k.isdigit() else k for k in path): np.asarray(value)
                    for path, value in _flatten(restored)}
            if name == "var" and stored_cfg.scan_layers != var_cfg.scan_layers:
                flat = var_convert.unstack_layers(flat, var_cfg.depth)
                if var_cfg.scan_layers:
                    flat = var_convert.stack_layers(flat, var_cfg.depth)
            _restore_into(models[name], flat, name)
    return Pipeline(models["var"], models["vqvae"])


# ----------------------------------------------------------------------------------------------
# Official checkpoints.

def load_official(vae_path, var_path, *, var_config: VARConfig | None = None,
                  attn_backend: str = "exact", attn_options=None, dtype: str = "float32",
                  param_dtype: str = "float32", scan_layers: bool | None = None,
                  remat: str | None = None) -> Pipeline:
    """Loads the official ``vae_*.pth`` and ``var_d*.pth`` (or their ``.npz`` exports).

    The architectures come from the tensor shapes. ``var_config``, when given, is what the
    caller expects: a checkpoint of another depth, width or schedule is refused with the fields
    that differ. ``attn_backend`` / ``attn_options`` / ``dtype`` choose how the model runs;
    ``scan_layers`` / ``remat`` its layout (None: ``var_config``'s, else the defaults: scanned).
    """
    var_sd = _read(var_path, "VAR")
    vae_sd = _read(vae_path, "VQ-VAE")
    runtime = dict(attn_backend=attn_backend, attn_options=attn_options or (), dtype=dtype,
                   param_dtype=param_dtype)
    runtime.update({name: value for name, value in (("scan_layers", scan_layers),
                                                     ("remat", remat)) if value is not None})
    if var_config is not None:
        var_convert.check_config(var_config, var_sd)
        var_cfg = VARConfig.from_dict({**var_config.to_dict(), **runtime})
    else:
        var_cfg = var_convert.infer_config(var_sd, **runtime)
    vae_cfg = infer_vqvae_config(vae_sd, var_cfg.patch_nums)
    var_model = construct.abstract_model(lambda: VAR(var_cfg, rngs=nnx.Rngs(0)))
    var_convert.load_var_state_dict(var_model, var_sd)
    vae_model = construct.abstract_model(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)))
    vqvae_convert.load_vqvae_state_dict(vae_model, vae_sd)
    return Pipeline(var_model, vae_model)


def _read(path, what):
    if isinstance(path, Mapping):
        return dict(path)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} checkpoint must be a path or a state dict, got "
                         f"{type(path).__name__}")
    return common.load_state_dict_file(path)
