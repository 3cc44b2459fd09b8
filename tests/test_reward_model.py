"""Reward models: scores equal HF `LlamaForSequenceClassification` (import and export), the
Bradley-Terry loss against its formula, a short training run learning a preference rule, and
the scorer `reward_from_checkpoint` equal to the direct function."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import rule_pairs

import llama_jax as lj
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.config import to_hf_config
from llama_jax.reward_model import (
    load_reward_model,
    save_reward_model,
    sequence_rewards,
    token_scores,
)
from llama_jax.train import main as train_main
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import with_rules
from train.data import DataConfig
from train.optim import OptimConfig, make_optimizer
from train.preference import make_preference_dataset
from train.reward_model import (
    RewardModelConfig,
    bucket,
    reward_from_checkpoint,
    reward_objective,
)
from train.rewards import Sample
from train.step import Policy, build_step, init_train_state
from train.tokenizers import load_tokenizer

CONFIG = lj.preset("tiny", num_labels=1)  # 512 ids: the byte tokenizer's vocabulary
PAD = 511  # never a token of the scored rows


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows of different lengths (pad id `PAD`), and their lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 17, 1, 24, 11], np.int32)
    tokens = np.full((len(lengths), 24), PAD, np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, PAD, n)
    return tokens, lengths


def _ours(params, tokens, lengths, config=CONFIG) -> np.ndarray:
    fn = jax.jit(sequence_rewards, static_argnames="config")
    return np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(lengths), config=config))


# --- Hugging Face parity ----------------------------------------------------------------------


@pytest.mark.slow
def test_scores_match_transformers_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        **to_hf_config(CONFIG, bos_token_id=0, eos_token_id=0, pad_token_id=PAD, rope_format="v5")
    )
    hf_config.initializer_range = 0.2  # rewards well away from 0, differing by row
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(hf_config).float().eval()
    hf.save_pretrained(tmp_path / "hf")
    tokens, lengths = _padded_batch()

    def hf_scores(model) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)))
        return out.logits[:, 0].float().numpy()

    theirs = hf_scores(hf)
    model = load_reward_model(tmp_path / "hf")
    assert model.config == CONFIG.replace(norm_eps=model.config.norm_eps)
    assert set(model.params) == {"tok_embeddings", "layers", "norm", "score"}
    ours = _ours(model.params, tokens, lengths)
    assert np.ptp(theirs) > 0.1, theirs
    diff = np.abs(ours - theirs).max()
    print(f"max |ours - transformers| = {diff:.2e} over rewards {theirs}")
    assert diff <= 1e-4, (diff, ours, theirs)

    save_reward_model(model, tmp_path / "ours", pad_token_id=PAD)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert (saved["num_labels"], saved["pad_token_id"]) == (1, PAD)
    back = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "ours")
    np.testing.assert_allclose(hf_scores(back.float().eval()), theirs, atol=1e-5, rtol=0)


def test_causal_lm_is_not_a_reward_model(tmp_path):
    lm = lj.init(lj.preset("tiny"))
    lj.export(lm, tmp_path / "lm", "hf")
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="sequence classifier"):
        lj.export(lj.init(CONFIG), tmp_path / "meta", "meta")


def test_reward_is_the_score_at_the_last_token():
    params = lj.init_params(CONFIG, 1)
    tokens, lengths = _padded_batch(1)
    hidden, _ = lj.forward(params, jnp.asarray(tokens), config=CONFIG, hidden_only=True)
    direct = np.asarray(token_scores(params, hidden))[np.arange(len(lengths)), lengths - 1]
    np.testing.assert_allclose(_ours(params, tokens, lengths), direct, atol=1e-6)


# --- Bradley-Terry training ---------------------------------------------------------------------

BYTES = load_tokenizer("bytes")
TRAIN = {"compute_dtype": "float32", "remat": "none"}


def _pair_batch(path: Path, seq_len: int = 64, batch: int = 8) -> dict[str, jax.Array]:
    cfg = DataConfig(seq_len=seq_len, batch=batch, tokenizer="bytes")
    rows = next(iter(make_preference_dataset([str(path)], BYTES, cfg, seed=0)))
    return {k: jnp.asarray(v) for k, v in rows.items()}


def _halves(batch) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(row, chosen ids, rejected ids) of every pair in the batch."""
    seg, tokens = np.asarray(batch["segment_ids"]), np.asarray(batch["tokens"])
    out = []
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0])[::2]:
            out.append((r, tokens[r][seg[r] == s], tokens[r][seg[r] == s + 1]))
    return out


def test_loss_and_metrics_follow_the_formula(tmp_path):
    config = CONFIG.replace(**TRAIN)
    params = lj.init_params(config, 2)
    params["score"] = params["score"] * 50  # rewards of order 1
    batch = _pair_batch(_write(tmp_path / "p.jsonl", rule_pairs(32, 3)), batch=2)
    cfg = RewardModelConfig(center_rewards_coefficient=0.1)
    parts = jax.jit(reward_objective(Policy(config), cfg))(params, {}, batch, None)
    pairs = _halves(batch)
    assert float(parts.count) == len(pairs) > 4
    rewards = {}
    for key in (1, 2):
        seqs = [p[key] for p in pairs]
        width = max(len(s) for s in seqs)
        tokens = np.stack([np.pad(s, (0, width - len(s))) for s in seqs])
        lengths = np.array([len(s) for s in seqs], np.int32)
        rewards[key] = _ours(params, tokens, lengths, config).astype(np.float64)
    c, r = rewards[1], rewards[2]
    assert np.abs(c - r).max() > 0.1
    loss = np.log1p(np.exp(-(c - r))) + 0.1 * (c + r) ** 2
    n = len(pairs)
    np.testing.assert_allclose(float(parts.loss_sum) / n, loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(parts.means["margin"]) / n, (c - r).mean(), atol=1e-5)
    np.testing.assert_allclose(float(parts.means["rewards/chosen"]) / n, c.mean(), atol=1e-5)
    np.testing.assert_allclose(float(parts.means["rewards/rejected"]) / n, r.mean(), atol=1e-5)
    assert float(parts.means["accuracy"]) == (c > r).sum()


def test_bradley_terry_learns_the_preferred_rule(tmp_path):
    config = CONFIG.replace(**TRAIN)
    mesh = make_mesh("fsdp=8")
    optimizer = make_optimizer(OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.0), 60)
    objective = reward_objective(Policy(config), RewardModelConfig())
    step = jax.jit(with_rules(build_step(objective, optimizer), mesh, "fsdp"), donate_argnums=0)
    state = place.place(init_train_state(config, optimizer, seed=0), config, mesh, "fsdp")
    cfg = DataConfig(seq_len=64, batch=16, tokenizer="bytes")
    path = _write(tmp_path / "train.jsonl", rule_pairs(1024, 0))
    train = iter(make_preference_dataset([str(path)], BYTES, cfg, seed=0))
    held_out = _pair_batch(_write(tmp_path / "test.jsonl", rule_pairs(96, 1)), 64, 8)

    def accuracy(params) -> float:
        parts = jax.jit(objective)(params, {}, held_out, None)
        return float(parts.means["accuracy"]) / float(parts.count)

    before = accuracy(state.params)
    for _ in range(60):
        batch = place.place_batch(next(train), mesh, "fsdp")
        state, metrics = step(state, batch, {})
    after = accuracy(state.params)
    print(f"held-out accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.7 and after >= 0.9, (before, after)
    assert float(metrics["accuracy"]) >= 0.9 and float(metrics["margin"]) > 1.0


# --- a run end to end, and its checkpoint as a reward -------------------------------------------


def _samples(n: int, seed: int) -> list[Sample]:
    """Each held-out pair's two halves as samples (prompt with its bos; no stop token)."""
    out = []
    for pair in rule_pairs(n, seed):
        prompt = tuple(BYTES.encode(pair["prompt"], bos=True))
        for key in ("chosen", "rejected"):
            text = pair[key]
            out.append(Sample(pair["prompt"], text, None, prompt, tuple(BYTES.encode(text))))
    return out


def test_run_from_a_causal_lm_exports_a_reward_model_that_scores(tmp_path):
    lm, start = tmp_path / "lm", lj.init(lj.preset("tiny"), seed=4)
    lj.export(start, lm, "hf")
    pairs = _write(tmp_path / "pairs.jsonl", rule_pairs(256, 0))
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    flags = ["--objective", "reward", "--init-from", str(lm), "--data", str(pairs),
             "--checkpoint-dir", str(run_dir), "--save-every", "2",
             "--mesh", "fsdp=8", "--set", "data.seq_len=64", "--set", "data.batch=8",
             "--set", "data.tokenizer=bytes", "--set", "compute_dtype=float32",
             "--set", "remat=none", "--set", "log_every=1", "--set", "peak_tflops=1.0",
             "--center-rewards-coefficient", "0.01"]  # fmt: skip
    assert train_main([*flags, "--steps", "2"]) == 0
    # resumed: the state (score head included) from the checkpoint, not from --init-from
    assert train_main([*flags, "--steps", "4", "--export-dir", str(export_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["pairs"] >= 8 and {"accuracy", "margin", "rewards/chosen"} <= set(rows[-1])
    saved = json.loads((export_dir / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["pad_token_id"] == BYTES.pad_id
    exported = load_reward_model(export_dir)
    from_run = lj.load(run_dir)
    assert from_run.config.num_labels == 1 and set(from_run.params) == set(exported.params)
    assert "output" not in exported.params
    # started from the LM (4 warm-up steps move it little), its head replaced by a fresh score
    np.testing.assert_allclose(
        exported.params["tok_embeddings"], start.params["tok_embeddings"], atol=1e-4
    )
    for a, b in zip(
        jax.tree.leaves(from_run.params), jax.tree.leaves(exported.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    samples = _samples(20, 1)  # 40 samples: two batches of 32, the second padded
    seqs = [s.prompt_ids + s.completion_ids for s in samples]
    width = max(len(s) for s in seqs)
    tokens = np.array([s + (0,) * (width - len(s)) for s in seqs], np.int32)
    lengths = np.array([len(s) for s in seqs], np.int32)
    direct = _ours(exported.params, tokens, lengths, exported.config)
    assert np.ptp(direct) > 0
    scores = reward_from_checkpoint(str(run_dir))(samples)
    assert scores.dtype == np.float32 and scores.shape == (len(samples),)
    np.testing.assert_allclose(scores, direct, atol=1e-5)
    on_mesh = reward_from_checkpoint(str(export_dir), mesh=make_mesh("fsdp=8"), batch=16)
    np.testing.assert_allclose(on_mesh(samples), direct, atol=1e-5)


def test_scorer_pads_to_few_lengths_and_cuts_to_the_context():
    assert [bucket(n, 1024) for n in (0, 1, 16, 17, 33, 1024, 5000)] == [
        16, 16, 16, 32, 64, 1024, 1024,
    ]  # fmt: skip
