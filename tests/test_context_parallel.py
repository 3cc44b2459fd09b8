"""Context parallelism (`llama_jax.context_parallel`): attention with the sequence split over
the `sequence` mesh axis equals unsplit attention, and the zig-zag layout balances the work
(8 emulated CPU devices, set by conftest)."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

from llama_jax import context_parallel as cp
from llama_jax import model as llama_model
from llama_jax.config import ConfigError, LlamaConfig, preset
from llama_jax.partitioning import BATCH, HEADS, KV_HEADS, LENGTH
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import logical_to_sharding, with_rules
from train.step import Policy, lm_objective

B, T, H, KV, HD = 4, 32, 4, 2, 8
# Two packed documents and right padding (segment 0) in one row, one document in another.
SEGMENTS = np.array([[1] * 11 + [2] * 17 + [0] * 4, [1] * 32, [3] * 5 + [4] * 27, [1] * 32])


def _qkv(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, H, HD), (B, T, KV, HD), (B, T, KV, HD), (B, T, H, HD))
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def _reference(q, k, v, segment_ids):
    mask = llama_model.attention_mask(segment_ids, (q.shape[0], q.shape[1]))
    return llama_model.grouped_attention(q, k, v, mask)


def _out_and_grads(attend, q, k, v, cotangent, segment_ids):
    """Attention's output and the gradients of <out, cotangent> in q, k and v."""
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids), q, k, v)
    return out, pullback(cotangent)


def _close(actual, expected, tol=1e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def expected():
    q, k, v, cotangent = _qkv()
    return jax.jit(partial(_out_and_grads, _reference))(q, k, v, cotangent, SEGMENTS)


@pytest.mark.parametrize(
    "mode, spec", [("all_gather", "sequence=4"), ("ring", "fsdp=2,sequence=4")]
)
def test_split_attention_equals_unsplit(mode, spec, expected):
    """Forward and gradients over sequence=4 (beside fsdp=2), causal, packed documents with
    padding, against plain attention on one device."""
    mesh = make_mesh(spec, jax.devices()[: 4 if spec == "sequence=4" else 8])
    place_as = lambda x, names: jax.device_put(x, logical_to_sharding(names, mesh, "fsdp"))  # noqa: E731
    q, k, v, cotangent = _qkv()
    args = (
        place_as(q, (BATCH, LENGTH, HEADS, None)),
        place_as(k, (BATCH, LENGTH, KV_HEADS, None)),
        place_as(v, (BATCH, LENGTH, KV_HEADS, None)),
        place_as(cotangent, (BATCH, LENGTH, HEADS, None)),
        place_as(SEGMENTS.astype(np.int32), (BATCH, LENGTH)),
    )
    attend = partial(cp.attention, mode=mode)
    run = jax.jit(with_rules(partial(_out_and_grads, attend), mesh, "fsdp"))
    out, grads = run(*args)
    assert out.sharding.spec[1] == "sequence"  # the output stays split over the sequence
    _close((out, grads), expected)


def test_one_device_with_several_query_and_key_tiles(monkeypatch, expected):
    """No mesh (one shard): the blocks' online softmax over 8-query x 4-key tiles, and its
    backward."""
    monkeypatch.setattr(cp, "QUERY_TILE", 8)
    monkeypatch.setattr(cp, "KEY_TILE", 4)
    q, k, v, cotangent = _qkv()
    run = jax.jit(partial(_out_and_grads, partial(cp.attention, mode="ring")))
    _close(run(q, k, v, cotangent, SEGMENTS), expected)


def test_zigzag_balances_the_causal_blocks_and_contiguous_does_not():
    """Each device computes the same number of (query chunk, key chunk) blocks, every block the
    causal mask needs is computed by the device holding its queries, and only one computed
    block per device (step 0's masked one) is wasted. The contiguous split needs 3, 7, 11, 15
    blocks on four devices: the last device waits for five times the first one's work."""
    shards = 4
    computed = [cp.computed_pairs(d, shards) for d in range(shards)]
    assert {len(pairs) for pairs in computed} == {2 * shards + 2}
    needed = [
        {(q, k) for q in cp.zigzag_chunks(d, shards) for k in range(q + 1)} for d in range(shards)
    ]
    for d in range(shards):
        assert len(computed[d]) == len(set(computed[d]))
        assert needed[d] <= set(computed[d])
        assert len(set(computed[d]) - needed[d]) == 1
    assert [cp.needed_pairs(cp.zigzag_chunks(d, shards)) for d in range(shards)] == [9] * 4
    contiguous = [cp.needed_pairs(cp.contiguous_chunks(d, shards)) for d in range(shards)]
    assert contiguous == [3, 7, 11, 15]


def test_train_loss_and_gradients_equal_the_unsplit_run():
    """The train step's objective (`train.step.lm_objective`: a tiny model, packed documents
    with their own positions, padding masked out of the loss) and its gradient in every weight,
    with ring attention on fsdp=2,sequence=4 against one device."""
    config = preset("tiny", attention="xla")
    positions = np.concatenate([np.arange(11), np.arange(17), np.zeros(4)]).astype(np.int32)
    rng = np.random.default_rng(2)
    batch = {
        "tokens": rng.integers(0, config.vocab_size, (B, T), dtype=np.int32),
        "targets": rng.integers(0, config.vocab_size, (B, T), dtype=np.int32),
        "positions": np.stack([positions, *[np.arange(T, dtype=np.int32)] * 3]),
        "segment_ids": SEGMENTS.astype(np.int32),
        "loss_mask": (SEGMENTS != 0).astype(np.float32),
    }
    params = jax.device_get(llama_model.init_params(config, 3))

    def loss_and_grads(config, spec, devices):
        mesh = make_mesh(spec, devices)
        objective = lm_objective(Policy(config))
        loss = lambda p, b: objective(p, {}, b, jax.random.key(0)).loss_sum  # noqa: E731
        run = jax.jit(with_rules(jax.value_and_grad(loss), mesh, "fsdp"))
        placed = place.place(params, config, mesh, "fsdp")
        return jax.device_get(run(placed, place.place_batch(batch, mesh, "fsdp")))

    expected = loss_and_grads(config, "1", jax.devices()[:1])
    actual = loss_and_grads(config.replace(context_parallel="ring"), "fsdp=2,sequence=4", None)
    _close(actual, expected)


def test_bad_lengths_and_modes_say_what_was_expected():
    mesh = make_mesh("sequence=4", jax.devices()[:4])
    q, k, v, _ = _qkv()
    short = lambda x: x[:, :12]  # noqa: E731
    with pytest.raises(ValueError, match=r"length 12 must be a multiple of 2 x 4"):
        with_rules(partial(cp.attention, mode="ring"), mesh, "fsdp")(
            short(q), short(k), short(v), None
        )
    with pytest.raises(ConfigError, match="context_parallel must be one of"):
        LlamaConfig(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, vocab_size=8,
                    context_parallel="heads")  # fmt: skip
