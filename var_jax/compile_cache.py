"""JAX's persistent compilation cache for the scripts: the second run of the same program on
the same machine loads its executables from disk instead of compiling them again.

Every script calls ``define_flag()`` at import and ``enable(FLAGS.compilation_cache)`` first in
``main``. ``--compilation_cache=false`` (or an empty value) switches the cache off, e.g. to time
compilation from scratch; any other value is the cache directory.
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                           "var_jax", "jax_compilation_cache")
_OFF = ("", "false", "none", "off", "0")


def define_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines ``--compilation_cache`` in ``flag_values`` (once)."""
    if "compilation_cache" not in flag_values:
        flags.DEFINE_string("compilation_cache", DEFAULT_DIR,
                            "Directory of JAX's persistent compilation cache; 'false' = off.",
                            flag_values=flag_values)


def enable(directory: str | None = DEFAULT_DIR, *, min_compile_seconds: float = 0.5
           ) -> str | None:
    """Points JAX's persistent cache at ``directory`` (created if needed); a false-like value
    turns it off. Returns the directory in use, or None."""
    if directory is None or str(directory).strip().lower() in _OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        _reset()
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Only programs that took a while to compile are worth a disk entry.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset()
    logging.info("JAX compilation cache: %s", directory)
    return directory


def _reset() -> None:
    """JAX opens its cache once per process, at the first compile; re-open it so that a
    directory set after that (a test, a notebook) takes effect."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # the private module moved: the setting then applies from the start
        return
    compilation_cache.reset_cache()
