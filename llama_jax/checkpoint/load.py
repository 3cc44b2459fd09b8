"""`load(path)`: any supported checkpoint directory to a `Model`, its layout detected.

Layouts: Meta (`params.json` + `consolidated.NN.pth`), Hugging Face (`config.json` +
safetensors, Meta files under `original/` used when the top level has no weights), our Orbax
format (`llama_jax.json` + `params/`), and a training run directory (`run_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import jax
import numpy as np
from jax.sharding import NamedSharding

from llama_jax.api import Model
from llama_jax.checkpoint import orbax_io, run_dir, sources
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.placement import ShardingsLike, place, resolve_shardings
from llama_jax.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.model import Params
from llama_jax.tokenizer import find_tokenizer

Layout = Literal["meta", "hf", "orbax", "run"]


def detect_layout(path: str | Path) -> tuple[Layout, Path]:
    """(layout, directory holding it) for a checkpoint directory or a file inside one."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_file():
        root = root.parent
    if orbax_io.is_orbax(root):
        return "orbax", root
    if (root / "config.json").is_file() and any(
        (root / f).is_file() for f in (SINGLE_FILE, INDEX_FILE)
    ):
        return "hf", root
    for meta in (root, root / "original"):
        if (meta / "params.json").is_file() and any(meta.glob("consolidated.*.pth")):
            return "meta", meta
    return "run", root


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}


def param_dtype(dtype: str | np.dtype | None) -> np.dtype | None:
    """`dtype` ("bf16", "bfloat16", np.float32, ...) as a numpy dtype params may have."""
    if dtype is None:
        return None
    try:
        d = np.dtype(_DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        raise CheckpointError(f"unknown dtype {dtype!r}") from None
    if d.name not in DTYPES:
        raise CheckpointError(f"dtype {d.name} not supported for params (one of {DTYPES})")
    return d


def load_params(
    path: str | Path,
    dtype: str | np.dtype | None = None,
    shardings: ShardingsLike = None,
    progress: bool | None = None,
) -> tuple[LlamaConfig, Params, Path]:
    """(config, params, directory) of the checkpoint at `path`; see `load`."""
    target = param_dtype(dtype)
    kind, root = detect_layout(path)
    if kind == "orbax":
        config = orbax_io.read_config(root)
        config = config if target is None else config.replace(param_dtype=target.name)
        mode = orbax_io.read_quantization(root)
        placed = resolve_shardings(config, shardings, mode)
        return config, orbax_io.load_orbax(root, config, placed, mode), root
    if kind == "run":
        return (*_load_run(root, target, shardings), root)
    source = sources.read_meta(root) if kind == "meta" else sources.read_hf(root)
    target = target or source.dtype
    config = source.config.replace(param_dtype=target.name)
    params = place(config, source.arrays, resolve_shardings(config, shardings), target, progress)
    return config, params, root


def _load_run(
    root: Path, target: np.dtype | None, shardings: ShardingsLike
) -> tuple[LlamaConfig, Params]:
    """The latest checkpoint of a training run (float32), placed and optionally cast."""
    try:
        config, params = run_dir.load_run_params(root, shardings)
    except CheckpointError as e:
        raise CheckpointError(
            f"{root}: not a Meta (params.json + consolidated.NN.pth), Hugging Face (config.json "
            f"+ safetensors) or llama_jax Orbax directory, nor a training run ({e})"
        ) from None
    if target is None or np.dtype(config.param_dtype) == target:
        return config, params
    return config.replace(param_dtype=target.name), jax.tree.map(lambda x: x.astype(target), params)


def load(
    path: str | Path,
    dtype: str | np.dtype | None = None,
    shardings: ShardingsLike = None,
    progress: bool | None = None,
) -> Model:
    """A `Model` from a Meta, Hugging Face, llama_jax Orbax or training-run directory.

    Params keep the checkpoint's dtype unless `dtype` ("float32", "bfloat16", "float16") is
    given. They are placed with `shardings`: a tree like the params, or a function from logical
    axis names to a `Sharding` (`sharding.rules.resolver(mesh, "fsdp_tp")` applies a rule
    preset); without, everything goes to the first device. The model's `mesh` is that of the
    placed params; its tokenizer is the checkpoint's file, or for a training run the one it
    trained with. Tensors are streamed one at a time; `progress` (None: when stderr is a
    terminal) shows a progress bar.
    """
    config, params, root = load_params(path, dtype, shardings, progress)
    tokenizer = find_tokenizer(root)
    if tokenizer is None and detect_layout(root)[0] == "run":
        tokenizer = run_dir.run_tokenizer(root)
    return Model(config, params, tokenizer=tokenizer, mesh=_mesh_of(params))


def _mesh_of(params: Params) -> jax.sharding.Mesh | None:
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None
