"""Persistent XLA compilation cache for rubrax's command-line entry points.

Compiling SmolLM2's sampler and RL update takes 30-45 s on CPU (minutes for 8B models
on accelerators); with JAX's persistent cache a rerun of the same shapes loads the
executables from disk instead. The `rubrax` CLI, `experiments/*.py` and the train / rl
entry points call `use_persistent_compilation_cache()` before they compile anything.
Library calls (and the test suite) never switch it on by themselves.

Where: $RUBRAX_JAX_CACHE if set (`0`, `off` or empty disables the cache), else
$RUBRAX_CACHE/jax-compilation, else ~/.cache/rubrax/jax-compilation. A cache directory
the user already gave JAX (JAX_COMPILATION_CACHE_DIR or jax.config) wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_OFF = ("0", "off", "false", "no", "")


def default_cache_dir() -> Path | None:
    """The directory the CLI caches compilations in, or None when disabled."""
    explicit = os.environ.get("RUBRAX_JAX_CACHE")
    if explicit is not None:
        return None if explicit.strip().lower() in _OFF else Path(explicit).expanduser()
    root = os.environ.get("RUBRAX_CACHE") or Path.home() / ".cache" / "rubrax"
    return Path(root).expanduser() / "jax-compilation"


def use_persistent_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `default_cache_dir()` (unless the user
    configured one, or disabled it). Works before or after jax is imported. Returns the
    directory in use, or None."""
    jax = sys.modules.get("jax")
    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
        jax is not None and jax.config.jax_compilation_cache_dir)
    if configured:
        return Path(configured)
    path = default_cache_dir()
    if path is None:
        return None
    if jax is None:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # read when jax is imported
    else:
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path
