"""JAX's persistent compilation cache, which the command-line tools turn on.

Compiling prefill, decode and train steps takes seconds (minutes for big models on TPU) at
every start, and on CPU it also leaves a few hundred MB of compiler memory in the process. With
the cache, a later start with the same model shapes, mesh and jax version loads the executables
from disk instead, starting faster and with less memory (the README has the figures).

`LLAMA_JAX_COMPILE_CACHE` names the directory (default `$XDG_CACHE_HOME/llama_jax/xla`, i.e.
`~/.cache/llama_jax/xla`); `off` disables it. Library users call `enable()` themselves: merely
importing llama_jax never changes JAX's global configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "LLAMA_JAX_COMPILE_CACHE"
OFF = "off"


def default_dir() -> Path | None:
    """The cache directory `LLAMA_JAX_COMPILE_CACHE` asks for; None when it says `off`."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() == OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama_jax" / "xla"


def enable(path: str | Path | None = None) -> Path | None:
    """Cache every compiled executable under `path` (default: `default_dir()`); returns the
    directory in use, or None when disabled. Call before the first compilation."""
    directory = Path(path).expanduser() if path is not None else default_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX's defaults skip executables that compile in under a second or are small; on CPU
    # that is every step of a small model, and their compiler memory is what the cache saves.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
