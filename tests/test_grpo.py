"""GRPO: group advantages, the loss against the formula in numpy, a zero policy gradient for
constant rewards, the engine's sampled log-probs against the trainer's, and runs of the loop
(the engine sampling the trainer's weights) with exact resume, LoRA and a tensor mesh."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import post
from llama_jax.model import forward
from llama_jax.train import sample_groups
from train.config import load_config
from train.grpo import (
    GRPOConfig,
    build_scorer,
    group_advantages,
    grpo_objective,
    round_batch,
    token_logps,
)
from train.rollouts import run_grpo
from train.step import Policy
from train.tokenizers import load_tokenizer

CONFIG = lj.preset("tiny")  # 512 ids (the byte tokenizer's), float32
BYTES = load_tokenizer("bytes")
PROMPTS = [BYTES.encode(q, bos=True) for q in ("3+4=", "9-2=", "7+8=")]


@pytest.fixture(scope="module")
def params():
    return lj.init(CONFIG, seed=3).params


@pytest.fixture(scope="module")
def rollout(params):
    """Four sampled completions of each prompt, at temperature 1 and top-p 1."""
    groups = sample_groups(
        CONFIG, params, None, BYTES, PROMPTS, [11, 12, 13], 4,
        max_new_tokens=6, temperature=1.0, logprobs=True,
    )  # fmt: skip
    return [c for g in groups for c in g]


def test_advantages_are_normalised_per_group():
    rewards = np.float32([1, 0, 0, 1, 5, 5, 5, 5, 0, 2, 4, 6])
    adv = group_advantages(rewards, 4, "group").reshape(3, 4)
    np.testing.assert_allclose(adv.mean(axis=1), 0, atol=1e-6)
    assert np.all(adv[1] == 0)  # a group of equal rewards teaches nothing
    g = np.float64([0, 2, 4, 6])
    np.testing.assert_allclose(adv[2], (g - 3) / (g.std(ddof=1) + 1e-4), rtol=1e-6)
    batch = group_advantages(rewards, 4, "batch")
    np.testing.assert_allclose(
        batch[8:], (g - 3) / (rewards.astype(np.float64).std(ddof=1) + 1e-4), rtol=1e-6
    )
    np.testing.assert_allclose(group_advantages(rewards, 4, "none")[8:], g - 3)


def test_engine_logprobs_equal_the_trainers(params, rollout):
    """The log-probs the engine reports while sampling are the trainer's recomputed ones of
    the same tokens: any gap would bias every importance ratio."""
    batch = round_batch(PROMPTS, rollout, np.zeros(len(rollout)), 16)
    hidden, _ = forward(
        params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
        jnp.asarray(batch["segment_ids"]), config=CONFIG, hidden_only=True,
    )  # fmt: skip
    trainer = np.asarray(token_logps(params, hidden, jnp.asarray(batch["targets"]), CONFIG, 1.0))
    mask = batch["loss_mask"] > 0
    assert mask.sum() == sum(len(c.token_ids) for c in rollout)
    gap = np.abs(trainer - batch["sampled_logps"])[mask]
    assert gap.max() <= 1e-4, gap.max()
    assert len({tuple(c.token_ids) for c in rollout}) > 1  # the samples differ


def _numpy_loss(logp, old, ref, adv, mask, cfg: GRPOConfig) -> float:
    """TRL 1.16's GRPO loss (`GRPOTrainer._compute_loss`, token-level importance sampling),
    written out in numpy."""
    ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 1 - cfg.epsilon, 1 + cfg.clip_high)
    loss = -np.minimum(ratio * adv[:, None], clipped * adv[:, None])
    if cfg.beta:
        loss = loss + cfg.beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if cfg.loss_type == "grpo":
        return float(np.mean((loss * mask).sum(1) / np.maximum(mask.sum(1), 1)))
    if cfg.loss_type == "dr_grpo":
        return float((loss * mask).sum() / (mask.shape[0] * cfg.max_new_tokens))
    return float((loss * mask).sum() / mask.sum())


@pytest.mark.parametrize(
    "cfg",
    [
        GRPOConfig(beta=0.0, loss_type="dapo", max_new_tokens=6),
        GRPOConfig(beta=0.04, loss_type="grpo", num_iterations=2, max_new_tokens=6),
        GRPOConfig(beta=0.1, loss_type="dr_grpo", epsilon_high=0.28, num_iterations=3,
                   max_new_tokens=6, temperature=0.7),
        GRPOConfig(beta=0.04, loss_type="bnpo", num_iterations=2, max_new_tokens=6),
    ],
    ids=["dapo", "grpo-kl", "dr_grpo-asym-temp", "bnpo"],
)  # fmt: skip
def test_loss_equals_the_formula(params, rollout, cfg):
    """On a fixed round (old log-probs shifted away from the current policy so that ratios
    leave the clip region, a reference further off), the objective's loss equals numpy's."""
    rng = np.random.default_rng(0)
    adv = group_advantages(rng.normal(size=len(rollout)).astype(np.float32), 4, "group")
    batch = {k: jnp.asarray(v) for k, v in round_batch(PROMPTS, rollout, adv, 16).items()}
    policy = Policy(CONFIG)
    hidden = policy.hidden(params, {}, batch)
    logp = np.asarray(token_logps(params, hidden, batch["targets"], CONFIG, cfg.temperature))
    mask = np.asarray(batch["loss_mask"])
    old = logp + rng.normal(scale=0.3, size=logp.shape) if cfg.num_iterations > 1 else logp
    ref = logp + rng.normal(scale=0.5, size=logp.shape)
    if cfg.num_iterations > 1:
        batch["old_logps"] = jnp.asarray(old, jnp.float32)
    if cfg.beta:
        batch["ref_logps"] = jnp.asarray(ref, jnp.float32)
    parts = grpo_objective(policy, cfg)(params, {}, batch, jax.random.key(0))
    expected = _numpy_loss(logp, old.astype(np.float32), ref.astype(np.float32), adv, mask, cfg)
    np.testing.assert_allclose(float(parts.loss_sum / parts.count), expected, rtol=1e-5, atol=1e-7)
    if cfg.num_iterations > 1:
        ratio = np.exp(logp - old)
        clipped = ((ratio < 0.8) & (adv[:, None] < 0)) | (
            (ratio > 1 + cfg.clip_high) & (adv[:, None] > 0)
        )
        np.testing.assert_allclose(float(parts.totals["clipped_sum"]), (clipped * mask).sum())


def test_sliced_head_changes_nothing(params, rollout):
    """`loss_chunks`: the head over 4 slices of the sequence gives the same log-probs and
    gradients."""
    adv = group_advantages(np.arange(len(rollout), dtype=np.float32), 4, "group")
    batch = {k: jnp.asarray(v) for k, v in round_batch(PROMPTS, rollout, adv, 16).items()}
    policy, cfg = Policy(CONFIG), GRPOConfig(beta=0.0)
    hidden = policy.hidden(params, {}, batch)
    whole, sliced = (
        token_logps(params, hidden, batch["targets"], CONFIG, 1.0, chunks) for chunks in (1, 4)
    )
    np.testing.assert_allclose(np.asarray(sliced), np.asarray(whole), rtol=1e-6, atol=1e-6)
    grads = [
        jax.grad(
            lambda p, c=chunks: grpo_objective(policy, cfg, c)(p, {}, batch, jax.random.key(0))[0]
        )(params)
        for chunks in (1, 4)
    ]
    for x, y in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


def test_constant_rewards_give_no_policy_gradient(params, rollout):
    """Equal rewards in every group: zero advantages, so with beta 0 the gradient is zero."""
    adv = group_advantages(np.ones(len(rollout), np.float32), 4, "group")
    batch = {k: jnp.asarray(v) for k, v in round_batch(PROMPTS, rollout, adv, 16).items()}
    objective = grpo_objective(Policy(CONFIG), GRPOConfig(beta=0.0))
    grads = jax.grad(lambda p: objective(p, {}, batch, jax.random.key(0)).loss_sum)(params)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) == 0.0


def test_scorer_reference_is_the_start_and_old_is_the_policy(params, rollout):
    """Before any update, the policy, its old log-probs and the reference copy all agree."""
    cfg = GRPOConfig(beta=0.04, num_iterations=2)
    batch = {
        k: jnp.asarray(v)
        for k, v in round_batch(PROMPTS, rollout, np.zeros(len(rollout)), 16).items()
    }
    fixed = jax.jit(build_scorer(Policy(CONFIG), cfg))(params, {"reference": params}, batch)
    mask = np.asarray(batch["loss_mask"]) > 0
    np.testing.assert_allclose(
        np.asarray(fixed["old_logps"])[mask], np.asarray(batch["sampled_logps"])[mask], atol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(fixed["old_logps"]), np.asarray(fixed["ref_logps"]))


# --- the loop ------------------------------------------------------------------------------


def _cfg(tmp_path, name: str, **overrides):
    base = {
        "model": "tiny",
        "objective": "grpo",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"tokenizer": "bytes"},
        "grpo": {
            "prompts": "builtin:arithmetic:train",
            "reward": "python:synthetic:ascii_share",
            "num_generations": 4,
            "prompts_per_step": 4,
            "max_new_tokens": 4,
            "beta": 0.04,
            "num_iterations": 2,
        },
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "steps": 4,
        "save_every": 2,
        "log_every": 1,
        "mesh": "fsdp=8",
        "checkpoint_dir": str(tmp_path / name),
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, base)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stopping_after(rounds: int):
    """The sampler, sending this process SIGTERM during round `rounds`: the loop finishes the
    round, saves and stops, as a preempted job does."""
    calls = []

    def sampler(*args, **kwargs):
        calls.append(1)
        if len(calls) == rounds:
            os.kill(os.getpid(), signal.SIGTERM)
        return sample_groups(*args, **kwargs)

    return sampler


@pytest.mark.slow
def test_grpo_run_resumes_exactly_and_raises_the_reward(tmp_path):
    """8 rounds straight, and 3 + 5 with a SIGTERM in between: the same samples (rewards), the
    same weights. The reward (the share of ASCII bytes in an answer) goes up."""
    straight, _ = run_grpo(_cfg(tmp_path, "a", steps=8), sample_groups)
    stopped, _ = run_grpo(_cfg(tmp_path, "b", steps=8), _stopping_after(3))
    assert stopped.preempted and int(stopped.state.step) == 6
    resumed, _ = run_grpo(_cfg(tmp_path, "b", steps=8), sample_groups)
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    assert int(straight.state.step) == 16  # 8 rounds of 2 updates
    for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a[0]["logprob_gap"] <= 1e-4
    assert np.mean([r["reward_mean"] for r in a[-2:]]) > a[0]["reward_mean"]
    for key in ("kl", "clip_fraction", "reward_std", "completion_length",
                "generated_tokens_per_sec", "train_tokens_per_sec"):  # fmt: skip
        assert np.isfinite(a[-1][key])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=4,tensor=2"])
def test_grpo_with_lora_on_a_tensor_mesh(tmp_path, mesh):
    """LoRA over the frozen base (the reference: adapters off), the engine sampling the merged
    weights on an FSDP x TP mesh; held-out evaluation before and after."""
    cfg = _cfg(
        tmp_path, "lora", mesh=mesh, rules="fsdp_tp", steps=3,
        lora={"rank": 4, "alpha": 8.0}, optim={"lr": 1e-2},
        grpo={"eval_prompts": "builtin:arithmetic:heldout"},
    )  # fmt: skip
    result, scores = run_grpo(cfg, sample_groups)
    records = _records(tmp_path / "lora")
    assert len(records) == 3 and records[0]["logprob_gap"] <= 1e-4
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero
    assert records[-1]["kl"] > 0
    assert set(scores) == {"before", "after"} and 0 <= scores["after"] <= 1
    assert set(result.state.params) == {"attention", "feed_forward"}  # the adapters alone


def test_grpo_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"grpo\.num_generations 1: must be an integer >= 2"):
        dataclasses.replace(GRPOConfig(), num_generations=1)
    with pytest.raises(ValueError, match=r"grpo\.loss_type 'ppo'"):
        GRPOConfig(loss_type="ppo")


@pytest.mark.slow
def test_post_grpo_and_evaluate_commands(tmp_path, capsys):
    """`python -m llama_jax.post grpo` with the training flags, then `evaluate` on its run
    directory (whose tokenizer the run recorded): one JSON line of rewards."""
    run_dir = tmp_path / "run"
    code = post.main([
        "grpo", "--preset", "tiny", "--tokenizer", "bytes", "--mesh", "fsdp=8",
        "--prompts", "builtin:arithmetic:train", "--reward", "arithmetic",
        "--num-generations", "2", "--prompts-per-step", "4", "--max-new-tokens", "2",
        "--steps", "2", "--checkpoint-dir", str(run_dir), "--set", "compute_dtype=float32",
    ])  # fmt: skip
    assert code == 0
    assert [r["step"] for r in _records(run_dir)] == [1, 2]
    capsys.readouterr()
    code = post.main([
        "evaluate", "--checkpoint", str(run_dir), "--prompts", "builtin:arithmetic:heldout",
        "--reward", "arithmetic", "--n", "2", "--max-new-tokens", "2", "--seed", "0",
    ])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompts"] == 31 and result["samples"] == 62
    assert 0 <= result["greedy"] <= 1 and 0 <= result["sampled_t1"] <= result["pass_at_2"] <= 1
