"""Engine, scheduler and `generate`: parity with transformers, batching invariance, stops."""

import numpy as np
import pytest
import torch

import llama_jax
from infer.batching import Overloaded, Scheduler
from infer.engine import Engine, EngineError
from infer.generate import generate
from infer.sampling import SamplingParams
from infer.text import TextStream

CONFIG = llama_jax.preset("tiny", max_seq_len=256)  # GQA + llama3 RoPE scaling, vocab 512
PROMPTS = [[5, 9, 2], list(range(1, 41)), [7], [300, 200, 100, 50, 25, 12, 6, 3, 1]]
CONTEXT = 128  # every engine here uses it, so compiled code is shared between tests


def run(model, prompts, **sampling):
    """`generate` with the shared context length."""
    return generate(model, prompts, max_len=CONTEXT, **sampling)


@pytest.fixture(scope="module")
def model():
    return llama_jax.init(CONFIG, seed=3)


def naive_greedy(model, prompt, n, width=64):
    """Greedy decoding by re-running the whole sequence without a cache (right-padded to one
    width, so one compiled shape serves every step: attention is causal)."""
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(np.argmax(model.logits(padded)[0, len(ids) - 1])))
    return ids[len(prompt) :]


@pytest.mark.slow
def test_greedy_matches_transformers_generate(model):
    from hf_oracle import hf_model_from_params

    hf = hf_model_from_params(CONFIG, model.params)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = PROMPTS[3]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    ours = run(model, prompt, max_new_tokens=64, stop_token_ids=())
    assert ours.token_ids == ref[0, len(prompt) :].tolist()
    assert ours.finish_reason == "length"


def test_ragged_batch_equals_one_by_one_and_no_cache(model):
    batch = run(model, PROMPTS, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, batch, strict=True):
        alone = run(model, prompt, max_new_tokens=12)
        assert out.token_ids == alone.token_ids == naive_greedy(model, prompt, 12)


def test_chunked_prefill_and_multi_step_decode_change_nothing(model):
    want = [c.token_ids for c in run(model, PROMPTS, max_new_tokens=10)]
    engine = Engine(
        CONFIG, model.params, slots=4, max_len=CONTEXT, prefill_chunk=16, steps_per_call=3
    )
    scheduler = Scheduler(engine)
    requests = [scheduler.submit(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    scheduler.run_until_done(requests)
    assert [r.token_ids for r in requests] == want
    # A 16-token budget per step: the 40-token prompt runs in 3 chunks, none longer than 16.
    assert {k.split()[2] for k in engine.compiles if k.startswith("prefill")} == {"chunk=16"}
    assert scheduler.stats.prefilled_tokens == sum(map(len, PROMPTS))


def test_sampling_top_k_1_is_greedy_and_seed_repeats_in_any_batch(model):
    greedy = run(model, PROMPTS, max_new_tokens=8)
    top1 = run(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_k=1)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]
    a = run(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=11)
    b = run(model, PROMPTS[1], max_new_tokens=8, temperature=1.0, seed=11)
    c = run(model, PROMPTS[1], max_new_tokens=8, temperature=1.0, seed=12)
    assert a[1].token_ids == b.token_ids != c.token_ids


def test_stop_tokens_and_length_limits(model):
    free = run(model, PROMPTS[0], max_new_tokens=10, stop_token_ids=())
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    out = run(model, PROMPTS[0], max_new_tokens=10, stop_token_ids=[stop])
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    # The context bounds generation: 122 prompt tokens leave 6.
    long = run(model, [3] * (CONTEXT - 6), max_new_tokens=50)
    assert len(long.token_ids) == 6 and long.finish_reason == "length"
    with pytest.raises(EngineError, match=f"prompt has {CONTEXT} tokens"):
        run(model, [3] * CONTEXT, max_new_tokens=5)


def test_logprobs_match_the_model(model):
    out = run(model, PROMPTS[3], max_new_tokens=4, logprobs=True, top_logprobs=3)
    ids = PROMPTS[3] + out.token_ids
    logits = model.logits([ids])[0, len(PROMPTS[3]) - 1 : -1]
    ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(4), out.token_ids], atol=1e-4)
    assert [top[0][0] for top in out.top_logprobs] == out.token_ids
    assert all(len(top) == 3 for top in out.top_logprobs)


def test_continuous_batching_join_leave_and_cancel(model):
    """Four slots, eight requests of different lengths: requests queue, join as slots free up
    and each gets exactly its solo answer; a cancelled request frees its slot."""
    engine = Engine(CONFIG, model.params, slots=4, max_len=CONTEXT)
    scheduler = Scheduler(engine)
    lengths = [3, 9, 5, 12, 2, 7, 1, 4]
    requests = [
        scheduler.submit(PROMPTS[i % 4], SamplingParams(max_new_tokens=n))
        for i, n in enumerate(lengths)
    ]
    doomed = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=100))
    for _ in range(4):
        scheduler.step()
    scheduler.cancel(doomed)
    scheduler.run_until_done([*requests, doomed])
    for i, (r, n) in enumerate(zip(requests, lengths, strict=True)):
        assert r.token_ids == naive_greedy(model, PROMPTS[i % 4], n)
    assert doomed.finish_reason == "cancelled" and len(doomed.token_ids) < 100
    while scheduler.step():
        pass
    assert engine.active_slots == [] and scheduler.load == 0


def test_prefill_shapes_are_bucketed(model):
    engine = Engine(CONFIG, model.params, slots=4, max_len=CONTEXT)
    scheduler = Scheduler(engine)
    for n in (3, 7, 11, 16):
        scheduler.run_until_done([scheduler.submit([1] * n, SamplingParams(max_new_tokens=2))])
    shapes = {k.split(" blocks")[0] for k in engine.compiles if k.startswith("prefill")}
    assert shapes == {"prefill rows=1 chunk=16"}


def test_sharded_engine_matches_unsharded(model):
    import jax

    from sharding.mesh import make_mesh
    from sharding.place import place

    mesh = make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    sharded = llama_jax.Model(CONFIG, place(model.params, CONFIG, mesh, "infer_tp"), mesh=mesh)
    got = run(sharded, PROMPTS, max_new_tokens=6)
    want = run(model, PROMPTS, max_new_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_default_stop_ids(shared_assets):
    from llama_jax.tokenizer import ByteTokenizer, Tokenizer, default_stop_ids

    assert default_stop_ids(None, CONFIG.vocab_size) == ()
    llama3 = llama_jax.preset("tiny-llama3").vocab_size
    assert set(default_stop_ids(None, llama3)) == {128001, 128008, 128009}
    meta = Tokenizer(shared_assets / "llama3" / "tokenizer.model")
    assert default_stop_ids(meta, llama3) == default_stop_ids(None, llama3) == meta.stop_tokens
    assert set(default_stop_ids(ByteTokenizer(), CONFIG.vocab_size)) == {257, 264, 265}


def test_text_stream_holds_back_and_cuts_at_stop_strings(shared_assets):
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer(shared_assets / "llama3" / "tokenizer.model")
    ids = tok.encode("Hello world. The END is near.")
    stream = TextStream(tok, stop=["END", "xyz"])
    pieces = []
    for t in ids:
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert stream.text == "Hello world. The " == "".join(pieces)
    plain = TextStream(tok)
    assert "".join([plain.add(t) for t in ids] + [plain.finish()]) == tok.decode(ids)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        TextStream(None, stop=["x"])


def test_queue_is_bounded_and_bad_prompts_are_refused(model):
    scheduler = Scheduler(Engine(CONFIG, model.params, slots=4, max_len=CONTEXT), max_waiting=1)
    scheduler.submit([1], SamplingParams())
    with pytest.raises(Overloaded):
        scheduler.submit([1], SamplingParams())
    with pytest.raises(EngineError, match=r"prompt: token id 512 at index \[0\] is out of range"):
        scheduler.submit([512], SamplingParams())
    with pytest.raises(EngineError, match="stop strings need a tokenizer"):
        scheduler.submit([1], SamplingParams(stop=("x",)))
