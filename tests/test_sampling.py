"""Sampler unit tests on hand-made logits: exact kept sets, greedy equivalences, seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.sampling import SamplingError, SamplingParams, SlotParams, filter_logits, sample


def slot_params(rows: int, **values) -> SlotParams:
    defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    defaults.update(values)
    return SlotParams(
        *(
            jnp.broadcast_to(jnp.asarray(defaults[name], dtype), (rows,))
            for name, dtype in zip(
                SlotParams._fields,
                (jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.uint32),
                strict=True,
            )
        )
    )


_filter = jax.jit(filter_logits)
_sample = jax.jit(sample, static_argnames="n_top")
WIDTH = 8  # logits are padded to [3, WIDTH] so one compiled filter serves every test


def kept(logits, **settings) -> list[set[int]]:
    """The ids each row keeps (rows are padded to 3, columns with very unlikely ids)."""
    logits = np.asarray(logits, np.float32)
    rows, width = logits.shape
    padded = np.full((3, WIDTH), -1e9, np.float32)
    padded[:rows, :width] = logits
    out = np.asarray(_filter(jnp.asarray(padded), slot_params(3, **settings)))
    keep = out > -np.inf
    return [set(np.flatnonzero(row[:width]).tolist()) for row in keep[:rows]]


# probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order of ids)
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = np.log(PROBS)[None]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.4, {1}),
        (0.49, {1}),
        (0.51, {1, 3}),
        (0.79, {1, 3}),
        (0.81, {1, 3, 0}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, expected):
    # Sorted probs 0.5, 0.3, 0.15, 0.05: the mass before each is 0, 0.5, 0.8, 0.95.
    assert kept(LOGITS, top_p=top_p) == [expected]


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.0, {0, 1, 2, 3}),
        (0.09, {0, 1, 2, 3}),
        (0.2, {0, 1, 3}),
        (0.5, {1, 3}),
        (0.7, {1}),
        (1.0, {1}),
    ],
)
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, expected):
    # thresholds min_p * 0.5: 0.045 keeps all; 0.1 drops 0.05; 0.25 keeps 0.5, 0.3; 0.35 only 0.5
    assert kept(LOGITS, min_p=min_p) == [expected]


@pytest.mark.parametrize(
    ("top_k", "expected"), [(1, {1}), (2, {1, 3}), (3, {1, 3, 0}), (9, {0, 1, 2, 3})]
)
def test_top_k_keeps_k_largest(top_k, expected):
    assert kept(LOGITS, top_k=top_k) == [expected]


def test_cuts_keep_ties_with_the_last_kept_token():
    assert kept([[1.0, 3.0, 3.0, 3.0, 0.0]], top_k=2) == [{1, 2, 3}]
    assert kept([[1.0, 3.0, 3.0, 3.0, 0.0]], top_p=0.1) == [{1, 2, 3}]


def reference_cut(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The kept set by sorting (distinct logits): top-k, then top-p of what is left."""
    order = np.argsort(-logits)
    kept_k = order[:top_k] if top_k else order
    probs = np.exp(logits[kept_k] - logits[kept_k].max())
    share = np.cumsum(probs / probs.sum())
    return set(kept_k[: int(np.argmax(share >= top_p)) + 1].tolist())


@pytest.mark.parametrize(("top_k", "top_p"), [(100, 1.0), (0, 0.5), (300, 0.9), (10, 0.5)])
def test_cuts_beyond_the_candidates_are_exact(top_k, top_p):
    """A flat distribution puts the top-p cut hundreds of tokens deep, and top-k above the
    candidate count needs the full-vocabulary search: both must still be exact."""
    logits = np.asarray(jax.random.normal(jax.random.key(5), (2, 1000))) * 0.3
    p = slot_params(2, top_k=top_k, top_p=top_p)
    out = np.asarray(_filter(jnp.asarray(logits), p))
    for row in range(2):
        got = set(np.flatnonzero(out[row] > -np.inf).tolist())
        assert got == reference_cut(logits[row], top_k, top_p)


def test_top_p_applies_after_top_k_and_temperature():
    # After top_k=3 the renormalised probs are 0.5/0.95, 0.3/0.95, 0.15/0.95 = .526, .316, .158
    assert kept(LOGITS, top_k=3, top_p=0.84) == [{1, 3}]
    assert kept(LOGITS, top_k=3, top_p=0.85) == [{1, 3, 0}]
    # Temperature 2 flattens to sqrt(p) renormalised: .379 .294 .208 .120 (ids 1 3 0 2), so
    # the mass before each is 0, .379, .673, .880.
    assert kept(LOGITS, temperature=2.0, top_p=0.66) == [{1, 3}]
    assert kept(LOGITS, temperature=2.0, top_p=0.69) == [{1, 3, 0}]


def test_settings_are_per_row():
    logits = np.repeat(LOGITS, 3, axis=0)
    p = slot_params(3)._replace(
        top_k=jnp.array([1, 0, 0], jnp.int32),
        top_p=jnp.array([1.0, 0.8, 1.0], jnp.float32),
        min_p=jnp.array([0.0, 0.0, 0.2], jnp.float32),
    )
    padded = np.full((3, WIDTH), -1e9, np.float32)
    padded[:, :4] = logits
    out = np.asarray(_filter(jnp.asarray(padded), p))[:, :4]
    rows = [set(np.flatnonzero(r > -np.inf).tolist()) for r in out]
    assert rows == [{1}, {1, 3}, {0, 1, 3}]


ROWS, VOCAB = 64, 1000  # every draw below has this shape: one compiled sampler


def draw(logits, positions, **settings):
    p = slot_params(ROWS, **settings)
    return _sample(jnp.asarray(logits, jnp.float32), p, jnp.asarray(positions, jnp.int32), n_top=5)


def test_top_k_1_and_temperature_0_are_greedy():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (ROWS, VOCAB))) * 3
    greedy = np.argmax(logits, axis=-1)
    positions = np.arange(ROWS)
    assert (np.asarray(draw(logits, positions, temperature=0.0).tokens) == greedy).all()
    assert (np.asarray(draw(logits, positions, temperature=1.5, top_k=1).tokens) == greedy).all()


def test_seed_repeats_and_keys_on_seed_and_position():
    logits = np.zeros((ROWS, VOCAB))  # uniform: any change of key changes the draw
    positions = np.arange(ROWS)
    a = np.asarray(draw(logits, positions, seed=7).tokens)
    assert (a == np.asarray(draw(logits, positions, seed=7).tokens)).all()
    assert (a != np.asarray(draw(logits, positions, seed=8).tokens)).any()
    # A row's draw depends on its seed and position only, not on where it sits in the batch.
    shuffled = np.random.default_rng(0).permutation(ROWS)
    assert (np.asarray(draw(logits, positions[shuffled], seed=7).tokens) == a[shuffled]).all()


def test_draws_follow_the_filtered_distribution():
    logits = np.full((ROWS, VOCAB), -1e9, np.float32)
    logits[:, :4] = LOGITS
    positions = np.arange(ROWS)
    top_p = np.concatenate([draw(logits, positions, seed=s, top_p=0.8).tokens for s in range(50)])
    assert set(top_p.tolist()) == {1, 3}
    assert abs(np.mean(top_p == 1) - 0.5 / 0.8) < 0.03
    plain = np.concatenate([draw(logits, positions, seed=s).tokens for s in range(50, 100)])
    freq = np.bincount(plain, minlength=4) / plain.size
    assert np.abs(freq - PROBS).max() < 0.03


def test_logprobs_are_the_models_and_top_is_sorted():
    logits = np.asarray(jax.random.normal(jax.random.key(2), (ROWS, VOCAB)))
    out = draw(logits, np.zeros(ROWS), temperature=0.0)
    ref = np.asarray(jax.nn.log_softmax(logits))
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(ROWS), tokens], rtol=1e-5)
    assert (np.asarray(out.top_ids)[:, 0] == tokens).all()
    assert (np.diff(np.asarray(out.top_logprobs), axis=1) <= 0).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0), ("top_k", -1),
     ("max_new_tokens", 0), ("seed", -1), ("top_logprobs", 21)],
)  # fmt: skip
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field} must be") as e:
        SamplingParams(**{field: value})
    assert e.value.field == field
