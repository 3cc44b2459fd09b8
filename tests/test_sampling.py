"""Sampler unit tests on hand-made logits: exact kept sets, greedy equivalences, seeding,
penalties and logit_bias against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.sampling import (
    MAX_LOGIT_BIAS,
    SamplingError,
    SamplingParams,
    SlotParams,
    TokenHistory,
    edit_logits,
    filter_logits,
    sample,
)


def slot_params(rows: int, **values) -> SlotParams:
    """`rows` slots sampling at temperature 1 with seed 0, no filter, penalty or bias, with
    `values` ([rows] or scalar) overriding per-slot fields."""
    base = SlotParams.host([(SamplingParams(), 0)] * rows)
    settings = {"temperature": 1.0, **values}
    return jax.tree.map(
        jnp.asarray,
        base._replace(
            **{
                name: np.broadcast_to(np.asarray(v, getattr(base, name).dtype), (rows,))
                for name, v in settings.items()
            }
        ),
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
     ("max_new_tokens", 0), ("seed", -1), ("top_logprobs", 21), ("presence_penalty", 2.5),
     ("presence_penalty", -2.01), ("frequency_penalty", -3), ("frequency_penalty", 2.1),
     ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
     ("repetition_penalty", float("inf"))],
)  # fmt: skip
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field} must be") as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


# --- penalties and logit_bias --------------------------------------------------------------

_edit = jax.jit(edit_logits)
_add = jax.jit(TokenHistory.add)
EDIT_VOCAB = 12


def edit_case():
    """Four slots over a 12-token vocabulary with prompts and generated tokens: slot 0 uses
    nothing, 1 only the repetition penalty, 2 frequency and presence, 3 everything."""
    settings = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.3),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=-0.5, presence_penalty=1.0,
                       logit_bias={7: -100.0, 2: 5.0}),
    ]  # fmt: skip
    prompts = [[1, 2, 3], [4, 4, 5, 9], [0, 6], [2, 3, 8, 10]]
    generated = [[3, 3, 11], [5, 6, 6], [6, 6, 6], [8, 1, 8]]  # one column per decode step
    logits = np.asarray(jax.random.normal(jax.random.key(3), (4, EDIT_VOCAB))) * 2
    return settings, prompts, generated, logits.astype(np.float32)


def history_of(prompts, generated) -> TokenHistory:
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = ids
    real = np.arange(width)[None, :] < np.asarray([len(x) for x in prompts])[:, None]
    history = TokenHistory.zeros(len(prompts), EDIT_VOCAB).record(
        jnp.asarray(tokens), jnp.asarray(real), jnp.zeros(real.shape, bool)
    )
    active = jnp.ones(len(prompts), bool)
    for step in zip(*generated, strict=True):
        history = _add(history, jnp.asarray(step, jnp.int32), active)
    return history


def reference_edit(logits, settings, prompts, generated) -> np.ndarray:
    """vLLM's edits, row by row over Python sets and counts."""
    out = logits.copy()
    for row, p in enumerate(settings):
        x = out[row]
        counts = np.bincount(generated[row], minlength=EDIT_VOCAB)
        for t in set(prompts[row]) | set(generated[row]):
            r = p.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for t, bias in p.logit_bias:
            x[t] += bias
    return out


def test_edit_logits_matches_the_reference():
    settings, prompts, generated, logits = edit_case()
    # Both signs of a seen logit meet the repetition penalty in slots 1 and 3.
    seen_signs = {np.sign(logits[row, t]) for row in (1, 3) for t in prompts[row]}
    assert seen_signs == {-1.0, 1.0}
    p = jax.tree.map(jnp.asarray, SlotParams.host([(s, 0) for s in settings]))
    history = history_of(prompts, generated)
    got = np.asarray(_edit(jnp.asarray(logits), p, history))
    np.testing.assert_allclose(got, reference_edit(logits, settings, prompts, generated),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(got[0], logits[0])  # slot 0 uses nothing
    # No slot using anything: every edit is skipped and the logits come back as they were.
    plain = slot_params(4)
    np.testing.assert_array_equal(np.asarray(_edit(jnp.asarray(logits), plain, history)), logits)


def test_history_counts_generated_tokens_of_active_slots_only():
    history = TokenHistory.zeros(3, EDIT_VOCAB)
    steps = [([1, 2, 3], [True, True, False]), ([1, 5, 3], [True, False, True])]
    for tokens, active in steps:
        history = _add(history, jnp.asarray(tokens, jnp.int32), jnp.asarray(active))
    expected = np.zeros((3, EDIT_VOCAB), np.int32)
    expected[0, 1], expected[1, 2], expected[2, 3] = 2, 1, 1
    np.testing.assert_array_equal(np.asarray(history.counts), expected)
    assert not np.asarray(history.prompt).any()
    # record marks only the real tokens (the rest is padding), and counts only generated ones.
    real = jnp.asarray([[True, True, True], [True, False, False]])
    prompt = TokenHistory.zeros(2, EDIT_VOCAB).record(
        jnp.asarray([[4, 4, 9], [7, 0, 0]]), real, jnp.zeros((2, 3), bool)
    )
    assert [set(np.flatnonzero(r).tolist()) for r in np.asarray(prompt.prompt)] == [{4, 9}, {7}]
    assert not np.asarray(prompt.counts).any()


def test_logit_bias_minus_100_bans_a_token_under_greedy():
    logits = np.zeros((2, EDIT_VOCAB), np.float32)
    logits[:, 7], logits[:, 4] = 10.0, 9.0
    rows = [(SamplingParams(logit_bias={7: -100}), 0), (SamplingParams(), 0)]
    p = jax.tree.map(jnp.asarray, SlotParams.host(rows))
    edited = _edit(jnp.asarray(logits), p, TokenHistory.zeros(2, EDIT_VOCAB))
    greedy = p._replace(temperature=jnp.zeros(2, jnp.float32))
    tokens = np.asarray(sample(edited, greedy, jnp.zeros(2, jnp.int32), None).tokens)
    assert tokens.tolist() == [4, 7]


def test_logit_bias_is_stored_sorted_and_hashable():
    p = SamplingParams(logit_bias={9: 1, 3: -2.5})
    assert p.logit_bias == ((3, -2.5), (9, 1.0))
    assert hash(p) == hash(SamplingParams(logit_bias=((9, 1.0), (3, -2.5))))
    host = SlotParams.host([(p, 0)])
    assert host.bias_ids.shape == host.bias_values.shape == (1, MAX_LOGIT_BIAS)
    assert host.bias_ids[0, :3].tolist() == [3, 9, -1]
    assert host.bias_values[0, :3].tolist() == [-2.5, 1.0, 0.0]
    p.check_vocab(10)
    with pytest.raises(SamplingError, match="token id 9 is out of range") as e:
        p.check_vocab(9)
    assert e.value.field == "logit_bias"


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({1: 100.5}, "values must be numbers in"),
        ({1: float("nan")}, "values must be numbers in"),
        ({-1: 1.0}, "token ids must be integers >= 0"),
        ({"5": 1.0}, "token ids must be integers >= 0"),
        ({True: 1.0}, "token ids must be integers >= 0"),
        ({i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, "at most 300 entries"),
        (((1, 1.0), (1, 2.0)), "more than once"),
        ([1, 2], "must map token ids to numbers"),
    ],
)
def test_bad_logit_bias_names_the_field(bias, message):
    with pytest.raises(SamplingError, match=message) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.field == "logit_bias"
