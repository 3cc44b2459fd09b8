"""`n` completions per prompt in `generate`: seeded like the server's choices, reproducible,
and the prompt prefilled once."""

import numpy as np
import pytest

import llama_jax
from infer.engine import DEFAULT_BLOCK_SIZE
from infer.generate import Completion
from infer.sampling import choice_seed

N = 8
SEED = 11
PROMPT = np.random.default_rng(5).integers(1, 512, 37).tolist()  # 2 full blocks of 16 and 5
SAMPLING = {"temperature": 1.0, "max_new_tokens": 6, "seed": SEED}


@pytest.fixture(scope="module")
def model():
    return llama_jax.init(llama_jax.preset("tiny", max_seq_len=128), seed=2)


@pytest.fixture(scope="module")
def samples(model) -> list[Completion]:
    return model.generate(PROMPT, n=N, **SAMPLING)


def test_seeded_samples_repeat_and_each_equals_its_choice_seed_alone(model, samples):
    assert len(samples) == N and all(isinstance(c, Completion) for c in samples)
    assert [c.token_ids for c in model.generate(PROMPT, n=N, **SAMPLING)] == [
        c.token_ids for c in samples
    ]
    for i, c in enumerate(samples):
        alone = model.generate(PROMPT, **{**SAMPLING, "seed": choice_seed(SEED, i)})
        assert isinstance(alone, Completion)
        assert alone.token_ids == c.token_ids, i
    assert choice_seed(SEED, 0) == SEED


def test_samples_differ_at_temperature_one(samples):
    assert len({tuple(c.token_ids) for c in samples}) == N


def test_the_prompt_is_prefilled_once(samples):
    """Only full blocks are shared, so each sample after the first recomputes the prompt's last
    partial block: 37 + 7 * 5 tokens prefilled in all."""
    tail = len(PROMPT) - DEFAULT_BLOCK_SIZE * ((len(PROMPT) - 1) // DEFAULT_BLOCK_SIZE)
    assert tail == 5
    assert [c.cached_tokens for c in samples] == [0] + [len(PROMPT) - tail] * (N - 1)
    assert [c.prefilled_tokens for c in samples] == [len(PROMPT)] + [tail] * (N - 1)
    assert sum(c.prefilled_tokens for c in samples) == len(PROMPT) + (N - 1) * tail


def test_a_list_of_prompts_gives_a_list_of_n_per_prompt(model, samples):
    other = PROMPT[:20]
    out = model.generate([PROMPT, other], n=3, **SAMPLING)
    assert [len(choices) for choices in out] == [3, 3]
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in samples[:3]]
    assert out[1][2].token_ids == model.generate(other, n=3, **SAMPLING)[2].token_ids
    flat = model.generate([PROMPT, other], **SAMPLING)  # n=1: one Completion per prompt
    assert [c.token_ids for c in flat] == [out[0][0].token_ids, out[1][0].token_ids]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_n_must_be_a_positive_integer(model, n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        model.generate(PROMPT, n=n, **SAMPLING)
