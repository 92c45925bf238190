"""The CLI's persistent compilation cache: where it goes, the opt-out, and that a rerun
really loads compiled executables from it."""

import os
import subprocess
import sys
import textwrap

from rubrax.jaxcache import default_cache_dir

_PROG = textwrap.dedent("""
    import sys, time
    from rubrax.jaxcache import use_persistent_compilation_cache
    print("dir", use_persistent_compilation_cache())
    import jax, jax.numpy as jnp
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jax._src import monitoring
    hits = []
    monitoring.register_event_listener(lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.0)
    f(jnp.ones((64, 64))).block_until_ready()
    print("hits", len(hits))
""")


def _run(env):
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", _PROG], env=env, capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    return lines["dir"], int(lines["hits"])


def test_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RUBRAX_JAX_CACHE", raising=False)
    monkeypatch.setenv("RUBRAX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "jax-compilation"
    monkeypatch.setenv("RUBRAX_JAX_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    for off in ("0", "off", ""):
        monkeypatch.setenv("RUBRAX_JAX_CACHE", off)
        assert default_cache_dir() is None


def test_second_process_loads_compilation_from_cache(tmp_path):
    env = {"RUBRAX_JAX_CACHE": str(tmp_path / "cc")}
    first_dir, first_hits = _run(env)
    assert first_dir == str(tmp_path / "cc") and first_hits == 0
    assert any((tmp_path / "cc").iterdir())  # an executable was written
    _, second_hits = _run(env)
    assert second_hits >= 1
    off_dir, off_hits = _run({"RUBRAX_JAX_CACHE": "0"})
    assert off_dir == "None" and off_hits == 0
