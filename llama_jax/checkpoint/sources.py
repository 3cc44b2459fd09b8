"""Meta and Hugging Face checkpoint directories, seen as lazy arrays in our param layout.

`read_meta` / `read_hf` open a directory, check every tensor name and shape against the config
file, and return, per param, one lazy array per layer. Nothing is read yet: placement
(`placement.py`) pulls exactly the blocks each device needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.lazy import Concat, LazyArray, read
from llama_jax.checkpoint.pth import PthFile
from llama_jax.checkpoint.safetensors_io import SafetensorsSet
from llama_jax.config import ConfigError, LlamaConfig, from_hf_config, from_meta_params

META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


@dataclass(frozen=True)
class Source:
    """A checkpoint's config and, per param path, its per-layer lazy arrays (one entry for
    unstacked params), in our layout and the file's dtype."""

    config: LlamaConfig
    arrays: dict[tuple[str, ...], tuple[LazyArray, ...]]

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[("tok_embeddings",)][0].dtype

    def get(self, spec: layout.TensorSpec, layer: int | None) -> np.ndarray:
        """A `layout.LayerGetter`: one layer read whole (for streaming conversion)."""
        return read(self.arrays[spec.path][layer or 0])


def _check_names(names: list[str], fmt: layout.Format, where: str, config: LlamaConfig) -> None:
    """Every name is a tensor of this architecture (or a known ignorable one), and every tensor
    the config needs is present."""
    for name in names:
        if layout.IGNORED.search(name):
            continue
        parsed = layout.parse_name(name, fmt)
        if parsed is None or (parsed[1] is not None and parsed[1] >= config.n_layers):
            raise CheckpointError(f"{where}: tensor {name}: unknown tensor name for this model")
    present = set(names)
    for name, _, _ in layout.tensor_names(config, fmt):
        if name not in present:
            raise CheckpointError(f"{where}: tensor {name}: missing")


def _check_dtype(dtype: np.dtype | None, where: str, name: str, kind: str) -> None:
    if dtype is None:
        raise CheckpointError(f"{where}: tensor {name}: dtype {kind} not supported")


def _meta_shards(root: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in root.iterdir() if (m := META_SHARD.match(p.name))}
    if not found:
        raise CheckpointError(f"{root}: no consolidated.NN.pth files")
    for rank in range(max(found) + 1):
        if rank not in found:
            raise CheckpointError(f"{root / f'consolidated.{rank:02d}.pth'}: missing shard")
    return [found[r] for r in sorted(found)]


def _merge_dim(
    spec: layout.TensorSpec, shape: tuple[int, ...], full: tuple[int, ...], mp: int
) -> int | None:
    """The torch dim along which `mp` ranks of `shape` make `full` (0 for a tensor that is not
    split): the spec's own dim or the other one (Llama 2 split its embedding on dim 1, Llama 3
    on dim 0). None if nothing fits."""
    if spec.mp_dim is None or mp == 1:
        return 0 if shape == full else None
    for d in (spec.mp_dim, 1 - spec.mp_dim):
        merged = list(shape)
        merged[d] *= mp
        if tuple(merged) == full:
            return d
    return None


def read_meta(root: str | Path) -> Source:
    """A Meta directory: `params.json` and `consolidated.NN.pth`, one file per model-parallel
    rank, merged along each tensor's parallel dim."""
    root = Path(root)
    try:
        config = from_meta_params(root / "params.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    shards = [PthFile(p) for p in _meta_shards(root)]
    mp = len(shards)
    for f in shards:
        _check_names(f.names(), "meta", str(f.path), config)
    arrays: dict[tuple[str, ...], list[LazyArray]] = {}
    for name, spec, _ in layout.tensor_names(config, "meta"):
        full = layout.torch_shape_full(spec, config)
        shapes = {f.tensors[name].shape for f in shards}
        dim = (
            _merge_dim(spec, shards[0].tensors[name].shape, full, mp) if len(shapes) == 1 else None
        )
        if dim is None:
            raise CheckpointError(
                f"{shards[0].path}: tensor {name}: shape {shards[0].tensors[name].shape} x {mp} "
                f"rank(s) disagrees with params.json (expects {full})"
            )
        ranks = shards if spec.mp_dim is not None else shards[:1]
        parts = []
        for f in ranks:
            t = f.tensors[name]
            _check_dtype(t.dtype, str(f.path), name, t.storage.type.name)
            parts.append(
                layout.to_ours(spec, config, "meta", partial(f.array, name), t.shape, t.dtype)
            )
        view = parts[0] if len(parts) == 1 else Concat(tuple(parts), layout.our_axis(spec, dim))
        arrays.setdefault(spec.path, []).append(view)
    return Source(config, {k: tuple(v) for k, v in arrays.items()})


def read_hf(root: str | Path) -> Source:
    """A Hugging Face directory: `config.json` and `model.safetensors` or indexed shards."""
    root = Path(root)
    try:
        config = from_hf_config(root / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    weights = SafetensorsSet(root)
    names = [n for n in weights.names() if not (config.tie_embeddings and n == "lm_head.weight")]
    _check_names(names, "hf", str(root), config)
    arrays: dict[tuple[str, ...], list[LazyArray]] = {}
    for name, spec, _ in layout.tensor_names(config, "hf"):
        file = weights.file(name)
        entry = file.entries[name]
        full = layout.torch_shape_full(spec, config)
        if entry.shape != full:
            raise CheckpointError(
                f"{file.path}: tensor {name}: shape {entry.shape} disagrees with config.json "
                f"(expects {full})"
            )
        _check_dtype(entry.dtype, str(file.path), name, entry.dtype_code)
        source: Callable[[], np.ndarray] = partial(file.array, name)
        view = layout.to_ours(spec, config, "hf", source, entry.shape, entry.dtype)
        arrays.setdefault(spec.path, []).append(view)
    return Source(config, {k: tuple(v) for k, v in arrays.items()})
