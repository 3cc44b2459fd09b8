"""`forward` traces for every preset, with and without a KV cache, from shapes alone.

`param_shapes` and `KVCache.abstract` are ShapeDtypeStructs and `jax.eval_shape` only traces,
so nothing is allocated: the 405B preset is checked as cheaply as `tiny`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from llama_jax import model as llama_model
from llama_jax.config import preset, preset_names
from llama_jax.kv_cache import KVCache

BATCH = 2
MAX_LEN = 32


def _tokens(time: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((BATCH, time), jnp.int32)


def _forward(config, params, tokens, cache=None, *, last_only=False):
    fn = functools.partial(llama_model.forward, config=config, last_only=last_only)
    return jax.eval_shape(fn, params, tokens, None, None, cache)


def _assert_logits(logits, config, time: int) -> None:
    assert isinstance(logits, jax.ShapeDtypeStruct)
    assert logits.shape == (BATCH, time, config.vocab_size)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last_only"])
def test_forward_shapes_without_cache(name, last_only):
    config = preset(name)
    params = llama_model.param_shapes(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    logits, cache = _forward(config, params, _tokens(16), last_only=last_only)
    _assert_logits(logits, config, 1 if last_only else 16)
    assert cache is None


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize(
    "time, last_only",
    [(1, False), (8, False), (8, True)],
    ids=["decode", "prefill", "prefill_last"],
)
def test_forward_shapes_with_cache(name, time, last_only):
    config = preset(name)
    params = llama_model.param_shapes(config)
    cache = KVCache.abstract(config, BATCH, MAX_LEN)
    assert cache.k.shape == (config.n_layers, BATCH, MAX_LEN, config.n_kv_heads, config.head_dim)
    logits, new_cache = _forward(config, params, _tokens(time), cache, last_only=last_only)
    _assert_logits(logits, config, 1 if last_only else time)
    assert isinstance(new_cache, KVCache)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), new_cache)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    assert got == want
    assert new_cache.lengths.dtype == jnp.int32
