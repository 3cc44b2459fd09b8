"""The paged KV cache: block allocation, prefix caching, preemption, penalties in the engine."""

import numpy as np
import pytest

import llama_jax
from infer.batching import Scheduler
from infer.blocks import BlockAllocator
from infer.engine import Engine
from infer.sampling import SamplingParams

CONFIG = llama_jax.preset("tiny", max_seq_len=256)  # GQA + llama3 RoPE scaling, vocab 512
CONTEXT = 128
RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(1, 512, n).tolist() for n in (3, 40, 1, 17, 9, 26)]


@pytest.fixture(scope="module")
def model():
    return llama_jax.init(CONFIG, seed=3)


def serve(model, prompts, params, **engine):
    """Run `prompts` through one scheduler; the requests and the scheduler."""
    prefix_cache = engine.pop("prefix_cache", True)
    scheduler = Scheduler(
        Engine(CONFIG, model.params, max_len=CONTEXT, **engine), prefix_cache=prefix_cache
    )
    requests = [scheduler.submit(p, params) for p in prompts]
    scheduler.run_until_done(requests)
    while scheduler.step():
        pass
    return requests, scheduler


def contiguous(slots=4):
    """The old layout: one whole-context block per sequence, nothing shared."""
    return {"slots": slots, "block_size": CONTEXT, "num_blocks": slots, "prefix_cache": False}


def test_allocator_shares_full_blocks_and_evicts_least_recently_used():
    pool = BlockAllocator(4, 2)
    tokens = [1, 2, 3, 4, 5]
    a = pool.allocate(3)
    pool.register(pool.digests(tokens), a)  # two full blocks: [1, 2] and [3, 4]
    assert pool.match(pool.digests(tokens), 5) == a[:2]  # 4 of 5 tokens: both full blocks
    assert pool.match(pool.digests([1, 2, 3, 4]), 4) == a[:1]  # the last token is recomputed
    assert pool.match(pool.digests([1, 2, 9, 9]), 4) == a[:1]  # diverges in block 2
    assert pool.match(pool.digests([9, 2, 3, 4]), 4) == []  # chained: block 2 alone is no hit
    pool.release(a)
    pool.release(a[:2])
    pool.release(a[:1])
    pool.release(a[:1])
    assert pool.available == 4 and pool.in_use == 0
    # The cached blocks are handed out last, oldest idle first: a[1] went idle before a[0].
    fresh = pool.allocate(3)
    assert a[1] in fresh and a[0] not in fresh
    assert pool.match(pool.digests(tokens), 5) == a[:1]
    assert pool.allocate(1) is None  # 3 held + 1 held by the match
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([fresh[0]] * 2)


def test_paged_decode_equals_contiguous(model):
    params = SamplingParams(max_new_tokens=12)
    want, _ = serve(model, PROMPTS, params, **contiguous())
    for block_size in (1, 4, 16):
        got, scheduler = serve(model, PROMPTS, params, slots=4, block_size=block_size)
        assert [r.token_ids for r in got] == [r.token_ids for r in want], block_size
        scheduler.check_idle()


def test_prefix_cache_hit_prefills_only_new_tokens(model):
    params = SamplingParams(max_new_tokens=6)
    system = RNG.integers(1, 512, 37).tolist()
    first = [*system, 5, 6, 7]
    scheduler = Scheduler(Engine(CONFIG, model.params, slots=4, max_len=CONTEXT, block_size=8))
    a = scheduler.submit(first, params)
    scheduler.run_until_done([a])
    # The next turn resends the conversation so far (the first turn's answer included).
    second = first + a.token_ids + [9, 10]
    b = scheduler.submit(second, params)
    scheduler.run_until_done([b])
    # The first request's KV covers its prompt and all its answer but the last token: 45
    # tokens, 5 full blocks of 8.
    assert a.cached_tokens == 0 and a.prefilled_tokens == len(first)
    assert b.cached_tokens == 40 and b.prefilled_tokens == len(second) - 40
    (cold,), _ = serve(model, [second], params, slots=4, block_size=8, prefix_cache=False)
    assert b.token_ids == cold.token_ids
    # A prompt that is all cached blocks still computes its last block (its logits are needed).
    c = scheduler.submit(second[:40], params)
    scheduler.run_until_done([c])
    assert c.cached_tokens == 32 and c.prefilled_tokens == 8
    while scheduler.step():
        pass
    scheduler.check_idle()


def test_samples_of_one_prompt_share_its_prefill(model):
    prompt = RNG.integers(1, 512, 50).tolist()
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=1)
    requests, scheduler = serve(model, [prompt] * 4, params, slots=4, block_size=8)
    # All four are admitted in one step: the first computes the prompt, the others take its
    # 6 full blocks as they are written and compute only the last 2 tokens.
    assert [r.cached_tokens for r in requests] == [0, 48, 48, 48]
    assert scheduler.stats.prefilled_tokens == 50 + 3 * 2
    assert len({tuple(r.token_ids) for r in requests}) == 1  # one seed: the same draw


def test_three_times_the_pool_all_complete_with_their_solo_answers(model):
    """Eight requests that together need about 3x the blocks of the pool: sequences are
    preempted and recomputed, and every output equals the request's answer alone."""
    params = SamplingParams(max_new_tokens=24)
    prompts = [RNG.integers(1, 512, n).tolist() for n in (20, 33, 8, 27, 15, 40, 11, 24)]
    solo = [serve(model, [p], params, slots=1, block_size=8)[0][0].token_ids for p in prompts]
    need = sum(-(-(len(p) + 24) // 8) for p in prompts)
    got, scheduler = serve(model, prompts, params, slots=8, block_size=8, num_blocks=need // 3)
    assert scheduler.stats.preemptions > 0
    assert scheduler.stats.peak_blocks <= need // 3
    assert [r.token_ids for r in got] == solo
    assert all(r.finish_reason == "length" for r in got)
    scheduler.check_idle()


def test_long_prompts_under_pressure_and_a_small_prefill_budget(model):
    """A 90-token prompt whose answer needs the whole pool, and an 80-token one admitted beside
    it (64 prompt tokens per step): the second holds blocks the first's decode then needs, so
    it is preempted, and both still complete correctly."""
    params = SamplingParams(max_new_tokens=16)
    prompts = [RNG.integers(1, 512, 90).tolist(), RNG.integers(1, 512, 80).tolist()]
    solo = [serve(model, [p], params, slots=1, block_size=8)[0][0].token_ids for p in prompts]
    got, scheduler = serve(
        model, prompts, params, slots=2, block_size=8, num_blocks=14, prefill_chunk=64
    )
    assert [r.token_ids for r in got] == solo
    assert scheduler.stats.preemptions > 0 and got[1].preemptions > 0
    scheduler.check_idle()


def naive_penalised_greedy(model, prompt, n, p: SamplingParams) -> list[int]:
    """Greedy decoding over the full model logits with the penalties and bias applied by
    hand (numpy), the way the OpenAI and Hugging Face documents define them."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = np.array(model.logits([ids])[0, -1], np.float64)
        seen = np.zeros_like(logits, bool)
        seen[ids] = True
        r = p.repetition_penalty
        logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
        counts = np.bincount(out, minlength=logits.size)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for token, bias in p.logit_bias:
            logits[token] += bias
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def test_penalties_and_logit_bias_in_the_decode_step(model):
    prompt = PROMPTS[3]
    plain, _ = serve(model, [prompt], SamplingParams(max_new_tokens=10), slots=2)
    banned = plain[0].token_ids[0]
    params = SamplingParams(
        max_new_tokens=10,
        repetition_penalty=1.5,
        frequency_penalty=0.8,
        presence_penalty=0.4,
        logit_bias={banned: -100.0, 7: 2.5},
    )
    (got,), _ = serve(model, [prompt], params, slots=2, block_size=4, prefill_chunk=16)
    assert got.token_ids == naive_penalised_greedy(model, prompt, 10, params)
    assert banned not in got.token_ids
    # The same under preemption: a recomputed sequence keeps its generated-token counts.
    both, scheduler = serve(
        model, [prompt, PROMPTS[1]], params, slots=2, block_size=4, num_blocks=14
    )
    assert scheduler.stats.preemptions > 0
    assert both[0].token_ids == got.token_ids
    assert both[1].token_ids == naive_penalised_greedy(model, PROMPTS[1], 10, params)
