"""Put parameters, training state, batches and KV caches on a mesh by the rule table.

Parameters carry their logical names (`llama_jax.model.logical_axes`). Anything that mirrors
them (a `TrainState`, optax moments, gradient accumulators) is matched by key path: a leaf whose
path ends with a parameter's path and has that parameter's shape is sharded like it; the rest
(step counters, RNG keys, scalars) is replicated. Nothing here needs to know the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model as llama_model
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import CACHE_AXES, PAGED_AXES, KVCache, PagedKVCache, Stored, map_stored
from llama_jax.lora import LoraConfig, adapter_shapes
from llama_jax.partitioning import BATCH_AXES
from sharding.rules import (
    Mesh,
    Rules,
    adapter_specs,
    logical_to_sharding,
    param_specs,
    path_str,
)


def _specs_by_path(specs: Any, shapes: Any) -> dict[tuple[str, ...], tuple[Any, PartitionSpec]]:
    return {
        tuple(path_str(p).split("/")): (shape.shape, spec)
        for (p, spec), shape in zip(
            jax.tree.leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
            jax.tree.leaves(shapes),
            strict=True,
        )
    }


def tree_shardings(
    tree: Any, config: LlamaConfig, mesh: Mesh, rules: str | Rules, lora: LoraConfig | None = None
) -> Any:
    """`NamedSharding` for every leaf of `tree` (arrays or `ShapeDtypeStruct`s): parameter-like
    leaves (and, with `lora`, adapter-like ones) like their parameter, everything else
    replicated."""
    sizes = dict(mesh.shape)
    by_path = _specs_by_path(param_specs(config, sizes, rules), llama_model.param_shapes(config))
    if lora is not None:
        by_path |= _specs_by_path(
            adapter_specs(config, lora, sizes, rules), adapter_shapes(config, lora)
        )
    longest = max(len(k) for k in by_path)

    def one(path: Any, leaf: Any) -> NamedSharding:
        keys = tuple(path_str(path).split("/"))
        for n in range(min(longest, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return NamedSharding(mesh, hit[1])
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map_with_path(one, tree)


def place(tree: Any, config: LlamaConfig, mesh: Mesh, rules: str | Rules) -> Any:
    """`tree` (params, a train state, ...) moved onto `mesh`, every process holding the same
    values."""
    return jax.device_put(tree, tree_shardings(tree, config, mesh, rules))


def init_params(config: LlamaConfig, seed: int, mesh: Mesh, rules: str | Rules) -> Any:
    """Random parameters created already sharded: no device or host ever holds the whole model."""
    shardings = tree_shardings(llama_model.param_shapes(config), config, mesh, rules)
    make = jax.jit(partial(llama_model.init_params, config, seed), out_shardings=shardings)
    return make()


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: str | Rules) -> dict[str, Any]:
    """Shardings for a batch dict of [batch, length] (or [batch]) arrays."""
    return {
        k: logical_to_sharding(BATCH_AXES[: v.ndim], mesh, rules, v.shape, f"batch[{k!r}]")
        for k, v in batch.items()
    }


def place_batch(batch: Mapping[str, Any], mesh: Mesh, rules: str | Rules) -> dict[str, Any]:
    """A global batch (the same full arrays on every process) placed on `mesh`. Multi-host jobs
    where each process loads only its rows use `sharding.distributed.global_batch`."""
    return jax.device_put(dict(batch), batch_shardings(batch, mesh, rules))


def stored_shardings(
    x: Stored, axes: tuple[str, ...], mesh: Mesh, rules: str | Rules, what: str
) -> Any:
    """Shardings of a cache's k or v by its logical `axes`: one for a float array, or values
    and scales alike for an int8 `QuantizedKV` (the scales by the axes less head_dim)."""
    return map_stored(
        lambda a, names: logical_to_sharding(names, mesh, rules, a.shape, what), x, axes
    )


def cache_shardings(
    cache: KVCache | PagedKVCache, mesh: Mesh, rules: str | Rules
) -> KVCache | PagedKVCache:
    """Shardings for a `KVCache` or `PagedKVCache` (or their abstract shapes): the pool by
    `PAGED_AXES`; block tables and lengths split over rows like a contiguous cache's rows."""
    rows = CACHE_AXES[1:2]
    lengths = logical_to_sharding(rows, mesh, rules, cache.lengths.shape, "KV lengths")
    if isinstance(cache, KVCache):
        kv = stored_shardings(cache.k, CACHE_AXES, mesh, rules, "KV cache")
        return KVCache(kv, kv, lengths)
    pool = stored_shardings(cache.k, PAGED_AXES, mesh, rules, "KV pool")
    shape = cache.block_tables.shape
    tables = logical_to_sharding((*rows, None), mesh, rules, shape, "block tables")
    return PagedKVCache(pool, pool, tables, lengths)


def place_cache(
    cache: KVCache | PagedKVCache, mesh: Mesh, rules: str | Rules
) -> KVCache | PagedKVCache:
    return jax.device_put(cache, cache_shardings(cache, mesh, rules))
