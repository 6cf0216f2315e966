"""The experiment config schema: defaults for every field and checks that run before compiling.

A config file in configs/ starts from `base_config()` and changes values; `validate` then rejects
any field the schema does not know (naming it) and any impossible value (naming the field, the
expectation and what was found), so a typo fails in a second instead of after a compile.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import ml_collections
from ml_collections.config_dict import placeholder

from var_jax import checks
from var_jax.attention import registry
from var_jax.data.pipeline import SOURCES
from var_jax.models.var import VARConfig
from var_jax.models.vqvae import VQVAEConfig
from var_jax.train.optim import OPTIMIZERS

_DATA_CLASSES = {"fashion_mnist": 10, "digits": 10}


# Option name -> type for var.model.attn_options (None = the backend's default), read from the
# attention registry: every option of every backend can be set from the command line.
ATTN_OPTION_TYPES = registry.option_types()


def _field_type(annotation):
    """The concrete type of an annotation like `int | None` (None when it is not one type)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if len(args) == 1 else None
    return annotation if isinstance(annotation, type) else None


def model_group(cls) -> ml_collections.ConfigDict:
    """Every field of a model config dataclass with its default, so that each one can be set
    with --config.<stage>.model.<field>=value whether or not the config file writes it. Fields
    defaulting to None become typed placeholders (ml_collections cannot override a bare None)."""
    hints = typing.get_type_hints(cls)
    group = {}
    for field in dataclasses.fields(cls):
        if field.name == "attn_options":
            group[field.name] = {k: placeholder(t) for k, t in ATTN_OPTION_TYPES.items()}
            continue
        default = field.default
        if default is dataclasses.MISSING:
            default = field.default_factory()
        if default is None:
            default = placeholder(_field_type(hints[field.name]) or object)
        group[field.name] = default
    return ml_collections.ConfigDict(group)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(source="fashion_mnist", root="", image_size=32, train_split="train",
                  eval_split="val", num_threads=0, num_eval=10000, eval_batch_size=500)
    # Device mesh ("data" x "fsdp"; one size may be -1 = every remaining device). Arrays with
    # fewer than fsdp_min_size elements stay replicated: splitting them costs more than it saves.
    c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**14)
    # eval_every / sample_every: steps between evaluations / sample grids (0: none on the way);
    # both also run after the last step unless evaluate_at_end is False. profile_steps > 0
    # traces that many steps with jax.profiler, profile_skip steps after the run's first
    # (compile and warm-up), into <workdir>/<stage>/profile (train.profiling).
    c.train = dict(log_every=50, checkpoint_every=500, keep_checkpoints=2, eval_every=0,
                   sample_every=0, evaluate_at_end=True, profile_steps=0, profile_skip=2)
    # model: every field of var_jax.models.vqvae.VQVAEConfig (config files .update() it).
    c.tokenizer = dict(
        model=model_group(VQVAEConfig), steps=1000, batch_size=32, lr=2e-3, warmup_steps=50,
        wpe=0.05, weight_decay=0.0, b1=0.9, b2=0.95, clip=2.0, l1_weight=1.0, l2_weight=1.0,
        vq_weight=1.0, dead_code_every=100, dead_code_threshold=0.03, usage_decay=0.99,
        eval_examples=2000)
    # model: every field of var_jax.models.var.VARConfig (cond_drop_rate is the label dropout).
    # coarse_batch_size > 0: every step also trains the first coarse_scales scales on that many
    # more examples (their tokens only; VARRecipe); 0 is the official recipe.
    # optimizer: "adamw" (the official recipe: base_lr * batch / 256, weight decay twd -> twde)
    # or "muon" (the blocks' matrices by Muon at peak muon_lr, the rest by Adam at the base_lr
    # rate, the same 'lin0' schedule for both, no weight decay; train.optim.make_muon_optimizer).
    c.var = dict(
        model=model_group(VARConfig), steps=1000, batch_size=32, base_lr=1e-4, warmup_steps=50,
        wp0=0.005, wpe=0.01, twd=0.05, twde=0.05, b1=0.9, b2=0.95, clip=2.0, bf16=False,
        optimizer="adamw", muon_lr=0.02,
        tokenizer_workdir="", eval_examples=2000, cache_tokens=False, scale_weight_power=0.0,
        coarse_batch_size=0, coarse_scales=4)
    c.sample = dict(cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, guidance_power=1.0,
                    per_class=8, eval_per_class=100, cfg_sweep=(0.0, 1.5, 3.0))
    c.classifier = dict(steps=1500, batch_size=128, lr=2e-3)
    return c


def _check_keys(config, schema, prefix: str) -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ValueError(f"config: unknown field {name!r}; known fields here: "
                             f"{sorted(schema.keys())}")
        value, default = config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"config: {name} must be a group of fields, found {value!r}")
            _check_keys(value, default, name + ".")


def _positive(config, *names: str) -> None:
    for name in names:
        value = config
        for part in name.split("."):
            value = value[part]
        checks.positive_number(f"config: {name}", value)


def vqvae_config(config):
    fields = dict(config.tokenizer.model)
    unknown = set(fields) - set(VQVAEConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config: unknown field(s) tokenizer.model.{sorted(unknown)[0]} "
                         f"(all unknown: {sorted(unknown)})")
    for k in ("ch_mult", "patch_nums"):
        if k in fields:
            fields[k] = tuple(fields[k])
    try:
        return VQVAEConfig(**fields)
    except ValueError as e:
        raise ValueError(f"config: tokenizer.model: {e}") from e


def var_config(config):
    fields = dict(config.var.model)
    unknown = set(fields) - set(VARConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config: unknown field(s) var.model.{sorted(unknown)[0]} "
                         f"(all unknown: {sorted(unknown)})")
    if "patch_nums" in fields:
        fields["patch_nums"] = tuple(fields["patch_nums"])
    if isinstance(fields.get("attn_options"), ml_collections.ConfigDict):
        # Unset (None) options are left to the backend's defaults.
        fields["attn_options"] = {k: v for k, v in fields["attn_options"].items()
                                  if v is not None}
    if config.var.bf16:
        fields["dtype"] = "bfloat16"
    try:
        return VARConfig(**fields)
    except ValueError as e:
        raise ValueError(f"config: var.model: {e}") from e


def validate(config, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Raises ValueError naming the first unknown field or impossible value; with `num_devices`
    (all processes together) also checks the mesh and the per-process batches against them."""
    _check_keys(config, base_config(), "")
    if config.data.source not in SOURCES:
        raise ValueError(f"config: data.source must be one of {SOURCES}, found "
                         f"{config.data.source!r}")
    _positive(config, "data.image_size", "data.eval_batch_size", "tokenizer.steps",
              "tokenizer.batch_size", "tokenizer.lr", "var.steps", "var.batch_size",
              "var.base_lr", "var.muon_lr", "train.log_every", "train.keep_checkpoints",
              "sample.per_class", "classifier.steps", "classifier.batch_size", "classifier.lr")
    for name in ("tokenizer.warmup_steps", "var.warmup_steps", "train.checkpoint_every",
                 "train.eval_every", "train.sample_every", "data.num_threads",
                 "tokenizer.dead_code_every", "sample.top_k", "train.profile_steps",
                 "train.profile_skip"):
        group, field = name.split(".")
        if config[group][field] < 0:
            raise ValueError(f"config: {name} must be >= 0, found {config[group][field]!r}")
    for name in ("tokenizer.b1", "tokenizer.b2", "var.b1", "var.b2", "tokenizer.usage_decay"):
        group, field = name.split(".")
        if not 0 <= config[group][field] < 1:
            raise ValueError(f"config: {name} must be in [0, 1), found {config[group][field]!r}")
    if config.var.optimizer not in OPTIMIZERS:
        raise ValueError(f"config: var.optimizer must be one of {OPTIMIZERS}, found "
                         f"{config.var.optimizer!r}")
    power = config.var.scale_weight_power
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power <= 1:
        raise ValueError(f"config: var.scale_weight_power must be a number in [0, 1] (0: the "
                         f"official mean over tokens, 1: every scale weighs the same), found "
                         f"{power!r}")
    if not 0 <= config.sample.top_p <= 1:
        raise ValueError(f"config: sample.top_p must be in [0, 1], found {config.sample.top_p}")
    checks.non_negative_number("config: sample.guidance_power", config.sample.guidance_power)
    mesh = config.mesh
    for name in ("data", "fsdp"):
        size = mesh[name]
        if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
            raise ValueError(f"config: mesh.{name} must be -1 or an int >= 1, found {size!r}")
    if mesh.data == -1 and mesh.fsdp == -1:
        raise ValueError("config: at most one of mesh.data and mesh.fsdp may be -1")
    if mesh.fsdp_min_size < 0:
        raise ValueError(f"config: mesh.fsdp_min_size must be >= 0, found {mesh.fsdp_min_size}")
    if num_devices is not None:
        known = [s for s in (mesh.data, mesh.fsdp) if s != -1]
        product = known[0] * known[1] if len(known) == 2 else known[0]
        if (len(known) == 2 and product != num_devices) or num_devices % product:
            raise ValueError(f"config: mesh.data x mesh.fsdp must equal the {num_devices} "
                             f"devices, found mesh.data={mesh.data} mesh.fsdp={mesh.fsdp}")
        local = num_devices // num_processes
        for name in ("tokenizer.batch_size", "var.batch_size", "var.coarse_batch_size"):
            group, field = name.split(".")
            batch = config[group][field]
            if batch % num_processes or (batch // num_processes) % local:
                raise ValueError(
                    f"config: {name}={batch} must split into {num_processes} per-process "
                    f"batches each divisible by the {local} local devices")
    vq = vqvae_config(config)
    var = var_config(config)
    if vq.image_size != config.data.image_size:
        raise ValueError(f"config: tokenizer.model.image_size={vq.image_size} must equal "
                         f"data.image_size={config.data.image_size}")
    for field, want in (("patch_nums", vq.patch_nums), ("vocab_size", vq.vocab_size),
                        ("cvae", vq.z_channels)):
        if getattr(var, field) != want:
            raise ValueError(f"config: var.model.{field}={getattr(var, field)} must match the "
                             f"tokenizer ({want})")
    checks.non_negative_int("config: var.coarse_batch_size", config.var.coarse_batch_size)
    if config.var.coarse_batch_size and not (
            isinstance(config.var.coarse_scales, int)
            and 1 <= config.var.coarse_scales < len(var.patch_nums)):
        raise ValueError(f"config: var.coarse_scales must be an int from 1 to "
                         f"{len(var.patch_nums) - 1} (scales before the last of "
                         f"var.model.patch_nums={var.patch_nums}), found "
                         f"{config.var.coarse_scales!r}")
    if config.var.cache_tokens and config.data.source == "image_folder":
        raise ValueError("config: var.cache_tokens needs a source without random augmentation "
                         "(fashion_mnist or digits), found data.source='image_folder'")
    classes = _DATA_CLASSES.get(config.data.source)
    if classes is not None and var.num_classes != classes:
        raise ValueError(f"config: var.model.num_classes={var.num_classes} must equal the "
                         f"{classes} classes of data.source={config.data.source!r}")
