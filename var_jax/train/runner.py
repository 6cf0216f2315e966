"""Entry points used by the scripts: validate a config, then train one stage."""

from __future__ import annotations

import os

import jax

from var_jax.train import config as config_lib
from var_jax.train import loop, sharding, tokenizer_recipe, var_recipe


def make_recipe(config, workdir: str, stage: str, mesh=None):
    if stage == "tokenizer":
        return tokenizer_recipe.TokenizerRecipe(config)
    if stage == "var":
        tokenizer_dir = config.var.tokenizer_workdir or workdir
        tokenizer = var_recipe.load_trained_tokenizer(
            config, os.path.join(tokenizer_dir, tokenizer_recipe.TokenizerRecipe.name),
            mesh=mesh)
        cache = None
        if config.var.cache_tokens:
            cache = var_recipe.build_token_cache(
                config, tokenizer, os.path.join(workdir, var_recipe.VARRecipe.name,
                                                "token_cache.npz"))
        return var_recipe.VARRecipe(config, tokenizer, cache)
    raise ValueError(f"stage: expected 'tokenizer' or 'var', found {stage!r}")


def run_stage(config, workdir: str, stage: str) -> dict:
    """Validates `config` (before anything is compiled) and trains `stage` in `workdir` on the
    mesh of every device of every process."""
    config_lib.validate(config, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
    mesh = sharding.make_mesh(config.mesh)
    return loop.train(make_recipe(config, workdir, stage, mesh), config, workdir, mesh)
