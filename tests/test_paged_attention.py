"""Decode attention over the paged pool: which path `forward` takes, and the Pallas kernel's
numerics (run in Pallas' TPU interpreter on this CPU machine) against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import llama_jax
from llama_jax import splash
from llama_jax.kv_cache import KVCache, PagedKVCache
from llama_jax.model import cached_attention_kernel, forward, grouped_attention, init_params
from llama_jax.paged_attention import paged_decode_attention, pages_per_compute_block
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import with_rules

# head_dim 128 (the kernel's lane width), 2 query heads per KV head
WIDE = llama_jax.preset("tiny", dim=256, n_heads=4, n_kv_heads=2, head_dim=128, max_seq_len=256)
BLOCK, BLOCKS = 8, 20
TABLES = np.full((2, 8), BLOCKS, np.int32)  # row 0: 6 blocks, row 1: 4, then "no block"
TABLES[0, :6] = [3, 7, 1, 12, 0, 5]
TABLES[1, :4] = [9, 2, 14, 11]


def bf16_exact(x: np.ndarray) -> jax.Array:
    """float32 values bfloat16 represents exactly: the interpreter's matmuls round their
    float32 operands to bfloat16, the reference's do not."""
    return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)


def paged(config, lengths=(0, 0)) -> PagedKVCache:
    k, v = PagedKVCache.pool_zeros(config, BLOCKS, BLOCK)
    return PagedKVCache(k, v, jnp.asarray(TABLES), jnp.asarray(lengths, jnp.int32))


@pytest.fixture
def tpu(monkeypatch):
    """Trace as if for TPUs: the kernel is chosen, and runs in Pallas' TPU interpreter."""
    monkeypatch.setattr(splash, "on_tpu", lambda: True)
    with pltpu.force_tpu_interpret_mode():
        yield


def test_auto_takes_the_xla_path_on_cpu():
    """Nothing but a paged pool, one token per row, "auto" attention, 128-lane heads and TPUs
    takes the kernel; on this CPU machine everything takes XLA."""
    cache = paged(WIDE)
    assert cached_attention_kernel(WIDE, cache, 1) == "xla"
    assert cached_attention_kernel(WIDE, KVCache.abstract(WIDE, 2, 64), 1) == "xla"


def test_kernel_choice_on_tpu(monkeypatch):
    monkeypatch.setattr(splash, "on_tpu", lambda: True)
    cache = paged(WIDE)
    assert cached_attention_kernel(WIDE, cache, 1) == "paged"
    assert cached_attention_kernel(WIDE, cache, 2) == "xla"  # prefill chunks
    assert cached_attention_kernel(WIDE.replace(attention="xla"), cache, 1) == "xla"
    assert cached_attention_kernel(WIDE, KVCache.abstract(WIDE, 2, 64), 1) == "xla"
    narrow = llama_jax.preset("tiny")  # head_dim 16
    assert cached_attention_kernel(narrow, paged(narrow), 1) == "xla"


def test_pages_per_compute_block_divides_the_table():
    assert pages_per_compute_block(8192, 16) == 32  # 512 tokens
    assert pages_per_compute_block(1024, 128) == 4
    assert pages_per_compute_block(6, 128) == 2
    assert pages_per_compute_block(3, 1024) == 1


@pytest.mark.usefixtures("tpu")
@pytest.mark.parametrize("layer", [0, 2])
def test_kernel_equals_gathered_attention(layer):
    """Each (row, KV head) reads its own blocks of its own layer, as far as its length."""
    rng = np.random.default_rng(1)
    n_layers, kv, hd, heads, width = 3, 2, 128, 8, 4
    k = bf16_exact(rng.standard_normal((n_layers, kv, 12, BLOCK, hd)))
    v = bf16_exact(rng.standard_normal((n_layers, kv, 12, BLOCK, hd)))
    q = bf16_exact(rng.standard_normal((3, 1, heads, hd)))
    table = jnp.asarray(rng.permutation(12)[: 3 * width].reshape(3, width), jnp.int32)
    lengths = jnp.asarray([5, 32, 17], jnp.int32)
    out = paged_decode_attention(q, k, v, layer, table, lengths)

    def gathered(x):  # [batch, width * BLOCK, kv, hd]
        return x[layer][:, table].transpose(1, 2, 3, 0, 4).reshape(3, -1, kv, hd)

    mask = (jnp.arange(width * BLOCK)[None, :] < lengths[:, None])[:, None, :]
    ref = grouped_attention(q, gathered(k), gathered(v), mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.usefixtures("tpu")
@pytest.mark.parametrize("mesh_spec", [None, "tensor=2", "data=2,tensor=2"])
def test_kernel_decode_step_equals_the_contiguous_cache(mesh_spec):
    """Prefill (XLA path) into both caches, then one decode token per row through the kernel:
    the logits match the contiguous cache's, the new token is in the pool, unsharded and with
    heads (and rows) split over a CPU mesh."""
    c = WIDE
    params = init_params(c)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.vocab_size, (2, 40)).astype(np.int32)
    segment_ids = (np.arange(40)[None] < np.array([40, 23])[:, None]).astype(np.int32)
    _, rows = forward(
        params, tokens, segment_ids=segment_ids, cache=KVCache.zeros(c, 2, 64), config=c
    )
    _, pool = forward(params, tokens, segment_ids=segment_ids, cache=paged(c), config=c)
    step = jnp.array([[5], [9]], np.int32)
    want, _ = forward(params, step, cache=rows, config=c)

    def decode(params, step, pool):
        assert cached_attention_kernel(c, pool, 1) == "paged"
        return forward(params, step, cache=pool, config=c)

    if mesh_spec is None:
        got, pool = jax.jit(decode)(params, step, pool)
    else:
        devices = jax.devices()[: 2 if mesh_spec == "tensor=2" else 4]
        mesh = make_mesh(mesh_spec, devices)
        pool = place.place_cache(pool, mesh, "infer_tp")
        got, pool = jax.jit(with_rules(decode, mesh, "infer_tp"))(params, step, pool)
    np.testing.assert_allclose(got, want, atol=2e-3)  # bfloat16-rounded matmuls (above)
    assert pool.lengths.tolist() == [41, 24]
    # row 0's token 40 went to its sixth block (5), slot 0, in every layer and head
    assert np.abs(np.asarray(pool.k[:, :, 5, 0])).sum() > 0
