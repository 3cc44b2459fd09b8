"""Stream lazy checkpoint arrays into (sharded) device arrays, one tensor at a time.

Each param is built with `jax.make_array_from_callback`, so every device (on multi-host: every
process) reads only its own block of the file. On CPU devices the aligned host block *is* the
device buffer (jax adopts it without a copy), so a stacked `[layers, ...]` param is read layer by
layer straight into it. On accelerators a stacked param is allocated on device and filled layer
by layer through a donated in-place update, so the host never holds more than one layer's block.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from tqdm import tqdm

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.lazy import Index, LazyArray, Stack, read
from llama_jax.config import LlamaConfig
from llama_jax.model import Params, logical_axes
from llama_jax.quantize import is_quantized, quantized_logical_axes

ShardingsLike = Params | Callable[[tuple[str, ...]], Sharding] | None


def resolve_shardings(
    config: LlamaConfig, shardings: ShardingsLike, quantization: str | None = None
) -> Params:
    """A sharding per param (of params quantized in `quantization`, if given): given as a tree,
    from a logical-axes -> sharding function, or (None) everything on the first device."""
    axes = logical_axes(config)
    if quantization is not None:
        axes = quantized_logical_axes(axes, config)
    is_axes = lambda x: isinstance(x, tuple) and not is_quantized(x)  # noqa: E731
    if shardings is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, axes, is_leaf=is_axes)
    if callable(shardings):
        return jax.tree.map(shardings, axes, is_leaf=is_axes)
    return shardings


def _layer_sharding(sharding: Sharding) -> Sharding:
    """The sharding of one layer of a stacked param (its leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise TypeError(f"cannot place stacked params with a {type(sharding).__name__}")


def _from_lazy(array: LazyArray, sharding: Sharding, dtype: np.dtype) -> jax.Array:
    """A device array holding `array`, each distinct block read once (replicas share it). On
    CPU the aligned host blocks become the device buffers without a copy."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            blocks[key] = read(array, index, dtype)
        return blocks[key]

    return jax.make_array_from_callback(tuple(array.shape), sharding, block, dtype=dtype)


@cache
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: Sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@cache
def _set_layer_fn(sharding: Sharding):
    def set_layer(stack: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def progress_bar(total: int, enabled: bool | None) -> tqdm:
    """A bytes progress bar on stderr; `enabled` None means only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tensors",
        disable=disable,
        leave=False,
    )


def _host_memory_is_device_memory(sharding: Sharding) -> bool:
    """On CPU devices an aligned host block becomes the device buffer without a copy."""
    return all(d.platform == "cpu" for d in sharding.device_set)


def _place_stacked(views: tuple[LazyArray, ...], sharding: Sharding, dtype: np.dtype) -> jax.Array:
    """A `[layers, ...]` param. On CPU the stack is read straight into its (aliased) buffers;
    elsewhere it is allocated on device and filled one layer at a time, so the host never holds
    more than one layer's block."""
    if _host_memory_is_device_memory(sharding):
        return _from_lazy(Stack(views), sharding, dtype)
    value = _zeros_fn((len(views), *views[0].shape), dtype, sharding)()
    per_layer, set_layer = _layer_sharding(sharding), _set_layer_fn(sharding)
    for i, view in enumerate(views):
        value = set_layer(value, _from_lazy(view, per_layer, dtype), jnp.int32(i))
    return value


def place(
    config: LlamaConfig,
    arrays: dict[tuple[str, ...], tuple[LazyArray, ...]],
    shardings: Params,
    dtype: np.dtype,
    progress: bool | None = None,
) -> Params:
    """The param tree of `config` built from per-layer lazy arrays, cast to `dtype`."""
    count = sum(len(v) for v in arrays.values())
    nbytes = {
        k: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in v) for k, v in arrays.items()
    }
    params: Params = {}
    done = 0
    with progress_bar(sum(nbytes.values()), progress) as bar:
        for spec in layout.specs(config):
            views = arrays[spec.path]
            sharding = layout.param_at(shardings, spec.path)
            if spec.stacked:
                value = _place_stacked(views, sharding, dtype)
            else:
                value = _from_lazy(views[0], sharding, dtype)
            node = params
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            node[spec.path[-1]] = value
            done += len(views)
            bar.set_postfix_str(f"{done}/{count} tensors", refresh=False)
            bar.update(nbytes[spec.path])
    return params
