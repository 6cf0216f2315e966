"""The scripts' persistent compilation cache: on, it writes executables to the directory;
'false' switches it off."""

import os

import jax
import jax.numpy as jnp

from var_jax import compile_cache


def test_cache_writes_entries_and_switches_off(tmp_path):
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        directory = compile_cache.enable(str(tmp_path / "cache"), min_compile_seconds=0.0)
        assert directory == str(tmp_path / "cache")
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(17.0)).block_until_ready()
        assert os.listdir(directory), "no executable was written to the cache"
        assert compile_cache.enable("false") is None
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
