"""Speculative decoding: greedy output is the target's own, sampling keeps its distribution."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import llama_jax
from infer.batching import Scheduler
from infer.cli import main
from infer.engine import Engine, EngineError
from infer.sampling import SamplingParams, SlotParams
from infer.speculative import Draft, accept, probabilities

CONFIG = llama_jax.preset("tiny", max_seq_len=256)  # vocab 512
DRAFT_CONFIG = llama_jax.preset("tiny", max_seq_len=256, n_layers=1)
CONTEXT = 128
# Every engine here has the same decode shape (2 slots, one 32-token block per sequence), so
# the compiled calls are shared between the tests.
SLOTS, BLOCK = 2, 32
RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(1, 512, n).tolist() for n in (3, 14, 1, 9)]  # one prefill shape


@pytest.fixture(scope="module")
def target():
    return llama_jax.init(CONFIG, seed=3)


@pytest.fixture(scope="module")
def other_draft(target):
    """A smaller model of the same vocabulary: the target's first layer alone."""
    layers = jax.tree.map(lambda x: x[:1], target.params["layers"])
    return llama_jax.Model(DRAFT_CONFIG, {**target.params, "layers": layers})


def engine(model, draft=None, **options):
    options = {"slots": SLOTS, "max_len": CONTEXT, "block_size": BLOCK, **options}
    return Engine(CONFIG, model.params, draft=draft, **options)


def run(model, prompts, params, draft=None):
    """Each prompt's tokens through one scheduler, and the scheduler."""
    scheduler = Scheduler(engine(model, draft))
    requests = [scheduler.submit(p, params) for p in prompts]
    scheduler.run_until_done(requests)
    while scheduler.step():
        pass
    scheduler.check_idle()
    return [r.token_ids for r in requests], scheduler


@pytest.fixture(scope="module")
def alone(target):
    return run(target, PROMPTS, SamplingParams(max_new_tokens=10))[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_another_draft_equals_target_alone(target, other_draft, alone, k):
    got, scheduler = run(
        target,
        PROMPTS,
        SamplingParams(max_new_tokens=10),
        Draft(DRAFT_CONFIG, other_draft.params, k),
    )
    assert got == alone
    assert scheduler.stats.draft_proposed > 0
    assert 0.0 < scheduler.stats.acceptance_rate < 1.0


def test_greedy_with_the_target_as_draft_accepts_everything(target, alone):
    params = SamplingParams(max_new_tokens=10)
    got, scheduler = run(target, PROMPTS, params, Draft(CONFIG, target.params, 3))
    assert got == alone
    assert scheduler.stats.acceptance_rate == 1.0


def test_ragged_continuous_batch_gives_each_request_what_it_gets_alone(target, other_draft):
    """Requests join while others decode, with stop tokens and sampling; speculation changes
    neither a greedy request's tokens (the target's own) nor a seeded one's (keyed by position)."""
    draft = Draft(DRAFT_CONFIG, other_draft.params, 3)
    greedy = SamplingParams(max_new_tokens=12)
    first = run(target, PROMPTS[1:2], greedy)[0][0]
    stop = SamplingParams(max_new_tokens=12, stop_token_ids=(first[4],))
    sampled = SamplingParams(max_new_tokens=9, temperature=0.9, top_k=40, seed=4)
    jobs = [(PROMPTS[0], greedy), (PROMPTS[1], stop), (PROMPTS[2], sampled), (PROMPTS[3], greedy)]
    want = [run(target, [p], s)[0][0] for p, s in jobs if s is not sampled]
    want.insert(2, run(target, [PROMPTS[2]], sampled, draft)[0][0])
    scheduler = Scheduler(engine(target, draft))
    requests = [scheduler.submit(*jobs[0])]
    for job in jobs[1:]:
        scheduler.step()
        scheduler.step()
        requests.append(scheduler.submit(*job))
    scheduler.run_until_done(requests)
    assert [r.token_ids for r in requests] == want
    assert len(want[1]) == 5 and requests[1].finish_reason == "stop"
    assert scheduler.stats.draft_proposed > 0


VOCAB = 8
K = 2


@jax.jit
def _accept_many(target_logits, draft_logits, seeds):
    """The first two tokens of one speculative call for every seed, and the draft's first
    proposals, with fixed logits at each position: [N] each, -1 where not emitted."""
    n = seeds.shape[0]
    params = SlotParams(*(jnp.asarray(np.repeat(x, n, axis=0)) for x in SLOT))._replace(seed=seeds)
    q = probabilities(jnp.broadcast_to(draft_logits, (n, VOCAB)), params)
    keys = jax.random.split(jax.random.key(0), n * K).reshape(n, K)
    drafts = jax.vmap(jax.vmap(lambda key: jax.random.categorical(key, jnp.log(q[0]))))(keys)
    target = jnp.broadcast_to(target_logits, (n, K + 1, VOCAB))
    tokens, counts = accept(
        target, jnp.broadcast_to(draft_logits, (n, K, VOCAB)), drafts, params, seeds % 1000
    )
    return tokens[:, 0], jnp.where(counts >= 2, tokens[:, 1], -1), drafts[:, 0]


SLOT = SlotParams.host([(SamplingParams(temperature=0.8), 0)])


def test_acceptance_rule_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    target_logits = rng.normal(size=(K + 1, VOCAB)).astype(np.float32) * 1.5
    draft_logits = rng.normal(size=VOCAB).astype(np.float32) * 1.5
    n = 20_000
    seeds = jnp.arange(n, dtype=jnp.uint32) * 7919
    first, second, proposed = map(np.asarray, _accept_many(target_logits, draft_logits, seeds))
    p = jax.nn.softmax(target_logits / 0.8, axis=-1)

    def p_value(samples, probs):
        observed = np.bincount(samples, minlength=VOCAB)
        probs = np.asarray(probs, np.float64)
        return stats.chisquare(observed, probs / probs.sum() * observed.sum()).pvalue

    assert p_value(first, p[0]) > 1e-3
    assert p_value(second[second >= 0], p[1]) > 1e-3  # after an accepted proposal
    assert p_value(proposed, p[0]) < 1e-6  # the test has power: the draft's own is refused


def test_speculation_refuses_what_breaks_exactness(target, other_draft):
    draft = Draft(DRAFT_CONFIG, other_draft.params, 2)
    scheduler = Scheduler(engine(target, draft))
    for setting in (
        {"repetition_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"response_format": '{"type": "json_object"}'},
    ):
        name = next(iter(setting))
        with pytest.raises(EngineError, match=f"^{name} cannot be combined with .*--draft"):
            scheduler.submit([1, 2], SamplingParams(**setting))
    with pytest.raises(EngineError, match="--steps-per-call must be 1 with --draft"):
        engine(target, draft, steps_per_call=2)
    wide = llama_jax.preset("tiny", vocab_size=1024)
    with pytest.raises(EngineError, match="draft's vocab_size is 1024, the target's 512"):
        engine(target, Draft(wide, {}, 2))


def test_cli_self_int8_draft_keeps_the_known_greedy_output(shared_assets, capsys, tmp_path):
    stories = shared_assets / "stories260K"
    expected = json.loads((stories / "expected" / "greedy_from_bos.json").read_text())
    common = ["--checkpoint", stories / "hf", "--prompt-ids", 1, "--max-new-tokens", 24,
              "--json", "--max-seq-len", 64]  # fmt: skip
    assert main([str(a) for a in [*common, "--draft", "self-int8", "--draft-tokens", 3]]) == 0
    assert json.loads(capsys.readouterr().out)["generated_ids"] == expected["tokens"][1:25]
    assert main([str(a) for a in [*common, "--draft", tmp_path / "nope"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama_jax.infer: error: --draft ") and err.count("\n") == 1


def test_prefix_cache_holds_only_accepted_tokens(target, other_draft):
    """A finished speculative sequence leaves its full blocks in the prefix cache: they must
    hold the tokens it kept, not the rejected proposals written past them."""
    draft = Draft(DRAFT_CONFIG, other_draft.params, 3)
    params = SamplingParams(max_new_tokens=10)
    scheduler = Scheduler(engine(target, draft, block_size=4))
    first = scheduler.submit(PROMPTS[1], params)
    scheduler.run_until_done([first])
    follow_up = [*PROMPTS[1], *first.token_ids, 7]
    second = scheduler.submit(follow_up, params)
    scheduler.run_until_done([second])
    assert second.cached_tokens >= 20
    alone = Scheduler(engine(target, block_size=4), prefix_cache=False)
    want = alone.submit(follow_up, params)
    alone.run_until_done([want])
    assert second.token_ids == want.token_ids
