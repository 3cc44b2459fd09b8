"""Model behaviour that needs no oracle: KV-cache decoding, packing, remat, dtypes."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from infer.layer_views import unstack_layers
from llama_jax import model
from llama_jax.kv_cache import KVCache


@pytest.fixture(scope="module")
def tiny():
    return lj.init(lj.preset("tiny"), seed=1)


def _tokens(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


@partial(jax.jit, static_argnames=("config",))
def _cached(params, tokens, cache, config):
    return lj.forward(params, tokens, cache=cache, config=config)


def test_logits_shape_and_dtype(tiny):
    out = tiny.logits(_tokens((2, 7), 512))
    assert out.shape == (2, 7, 512) and out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("layers", ["stacked", "per_layer"])
def test_token_by_token_decode_matches_full_forward(tiny, layers):
    config = tiny.config
    params = tiny.params if layers == "stacked" else unstack_layers(tiny.params)
    tokens = _tokens((2, 24), config.vocab_size)
    full = tiny.logits(tokens)
    cache = KVCache.zeros(config, batch=2, max_len=32)
    prefix = 9  # a multi-token prefill, then one token at a time
    logits, cache = _cached(params, jnp.asarray(tokens[:, :prefix]), cache, config)
    steps = [np.asarray(logits)]
    for t in range(prefix, tokens.shape[1]):
        logits, cache = _cached(params, jnp.asarray(tokens[:, t : t + 1]), cache, config)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [24, 24]


def test_unstacked_layers_on_cpu_are_views_of_the_stacked_weights(tiny):
    stacked = tiny.params["layers"]["feed_forward"]["w1"]
    per_layer = unstack_layers(tiny.params)["layers"]
    assert len(per_layer) == tiny.config.n_layers
    for i, layer in enumerate(per_layer):
        w1 = layer["feed_forward"]["w1"]
        np.testing.assert_array_equal(w1, stacked[i])
        # No copy: layer i's array starts i layers into the stacked buffer.
        offset = w1.unsafe_buffer_pointer() - stacked.unsafe_buffer_pointer()
        assert offset == i * w1.nbytes


def test_ragged_rows_advance_independently(tiny):
    """Right-padded prefill: each row's cache length is its own prompt length and its next-token
    logits equal those of the row run alone."""
    config = tiny.config
    a, b = _tokens((1, 5), config.vocab_size, 1), _tokens((1, 8), config.vocab_size, 2)
    tokens = np.zeros((2, 8), np.int32)
    tokens[0, :5], tokens[1] = a[0], b[0]
    segments = (np.arange(8)[None] < np.array([[5], [8]])).astype(np.int32)
    cache = KVCache.zeros(config, batch=2, max_len=16)
    logits, cache = jax.jit(partial(lj.forward, config=config))(
        tiny.params, jnp.asarray(tokens), segment_ids=jnp.asarray(segments), cache=cache
    )
    assert np.asarray(cache.lengths).tolist() == [5, 8]
    np.testing.assert_allclose(np.asarray(logits)[0, :5], tiny.logits(a)[0], atol=1e-5)
    nxt = np.array([[7], [9]], np.int32)
    step, _ = _cached(tiny.params, jnp.asarray(nxt), cache, config)
    alone_a = tiny.logits(np.concatenate([a, nxt[:1]], axis=1))[0, -1]
    alone_b = tiny.logits(np.concatenate([b, nxt[1:]], axis=1))[0, -1]
    np.testing.assert_allclose(np.asarray(step)[:, 0], np.stack([alone_a, alone_b]), atol=1e-5)


def test_packed_documents_do_not_see_each_other(tiny):
    """Bit-identical whatever the neighbour in the row, and equal to each document alone up to
    float32 reduction order (different key lengths change XLA's summation order)."""
    config = tiny.config
    doc1, doc2 = _tokens((1, 6), config.vocab_size, 3), _tokens((1, 10), config.vocab_size, 4)
    other1, other2 = _tokens((1, 6), config.vocab_size, 5), _tokens((1, 10), config.vocab_size, 6)
    positions = np.concatenate([np.arange(6), np.arange(10)])[None]
    segments = np.array([[1] * 6 + [2] * 10])

    def packed(first, second):
        row = np.concatenate([first, second], axis=1)
        return tiny.logits(row, positions=positions, segment_ids=segments)[0]

    out = packed(doc1, doc2)
    np.testing.assert_array_equal(out[:6], packed(doc1, other2)[:6])
    np.testing.assert_array_equal(out[6:], packed(other1, doc2)[6:])
    np.testing.assert_allclose(out[:6], tiny.logits(doc1)[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[6:], tiny.logits(doc2)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("remat", ["full", "dots", "minimal"])
def test_remat_changes_nothing_numerically(tiny, remat):
    config = tiny.config.replace(remat=remat)
    tokens = jnp.asarray(_tokens((2, 12), config.vocab_size))

    def loss(params, cfg):
        logits, _ = lj.forward(params, tokens, config=cfg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    g_plain = jax.jit(jax.grad(partial(loss, cfg=tiny.config)))(tiny.params)
    g_remat = jax.jit(jax.grad(partial(loss, cfg=config)))(tiny.params)
    for x, y in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_params_and_stays_close(tiny):
    config = tiny.config.replace(compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tiny.params))
    tokens = _tokens((1, 16), config.vocab_size)
    bf16 = lj.Model(config, tiny.params).logits(tokens)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, tiny.logits(tokens), atol=0.05)


def test_weight_cast_for_bf16_compute_is_astype_bit_for_bit():
    """The layer loop casts weights with integer ops on the bits (so XLA cannot hoist the cast
    out of the loop); it must round exactly as `astype` does, NaN and inf included, and pass
    gradients back as float32."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(50_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 50_000)
    edges = [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, 1e-45, 1.00390625, 1.01171875]
    w = jnp.asarray(np.concatenate([w, np.asarray(edges, np.float32)]))
    ours = model.cast_for_compute(w, jnp.dtype("bfloat16"))
    assert ours.dtype == jnp.bfloat16
    as_bits = partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
    np.testing.assert_array_equal(as_bits(ours), as_bits(w.astype(jnp.bfloat16)))
    grad = jax.grad(lambda x: jnp.sum(model.cast_for_compute(x, jnp.bfloat16) * 3))(w[:4])
    assert grad.dtype == jnp.float32
    np.testing.assert_array_equal(grad, 3.0)


def test_last_only_equals_last_position(tiny):
    tokens = jnp.asarray(_tokens((2, 9), 512))
    last, _ = jax.jit(partial(lj.forward, config=tiny.config, last_only=True))(tiny.params, tokens)
    assert last.shape == (2, 1, 512)
    np.testing.assert_allclose(np.asarray(last)[:, 0], tiny.logits(tokens)[:, -1], atol=1e-6)


def test_tokens_must_be_2d(tiny):
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        tiny.logits(np.arange(4))


def test_token_ids_beyond_the_vocabulary_are_refused_not_nan(tiny):
    """An id past the table would gather a NaN/clamped row inside jit: refuse it by name."""
    with pytest.raises(
        ValueError,
        match=r"token id 128000 at index \[0, 0\] is out of range: "
        r"this model's vocab_size is 512",
    ):
        tiny.logits(np.array([[128000, 9906, 1917]]))
    with pytest.raises(ValueError, match=r"token id -1 at index \[1, 2\]"):
        tiny.logits(np.array([[1, 2, 3], [4, 5, -1]]))
    assert np.isfinite(tiny.logits(np.array([[1, 2, 511]]))).all()
