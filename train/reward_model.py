"""Reward-model training (objective `reward`) and a trained reward model as a reward function.

Bradley-Terry over the preference pairs DPO reads (`train.preference`, both halves of a pair
in one forward): the reward r of a half is the score head at the half's last input token
(`llama_jax.reward_model`), and a pair's loss is -log sigmoid(r_c - r_r), plus, as TRL's
`RewardTrainer` offers, `center_rewards_coefficient` * (r_c + r_r)^2, which keeps rewards
centred on 0. Every weight and the head are trained; a run starting from a causal LM
(`init_from`) gets a fresh head in place of the LM head. A pair's half is its ids without the
last one (the end-of-text or end-of-turn id that closes the completion: a packed half's
inputs), so scored samples should not carry their stop token either, as `Sample`s do not.

`reward_from_checkpoint(path)` is the reward `train.rewards.parse_reward("model:PATH")` gives:
the scalar score of each sample's prompt + completion ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.model import Params
from llama_jax.reward_model import (
    SCORE,
    init_score_head,
    last_token_mask,
    load_reward_model,
    sequence_rewards,
    token_scores,
)
from sharding.place import place_batch
from sharding.rules import resolver, with_rules
from train.preference import max_pairs, per_pair_sums, segment_sums, split_halves
from train.rewards import Sample
from train.step import Batch, Frozen, LossParts, Objective, Policy

MIN_BUCKET = 16  # the shortest padded length the scorer compiles for


@dataclass(frozen=True)
class RewardModelConfig:
    """The `reward_model:` section: `center_rewards_coefficient` weighs the (r_c + r_r)^2 term
    (TRL's `RewardConfig` field of that name; 0: off)."""

    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"reward_model.center_rewards_coefficient {self.center_rewards_coefficient}: "
                "must be >= 0"
            )


def pair_rewards(params: Params, hidden: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) rewards [B, P] of the packed pairs: each half's score at its last
    token (0 in pair slots holding no pair)."""
    seg = batch["segment_ids"]
    scores = jnp.where(last_token_mask(seg), token_scores(params, hidden), 0.0)
    return split_halves(segment_sums(scores, seg, max_pairs(seg.shape[1])))


def pair_losses(cfg: RewardModelConfig, chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """Per-pair Bradley-Terry loss, with the optional centring term."""
    loss = -jax.nn.log_sigmoid(chosen - rejected)
    return loss + cfg.center_rewards_coefficient * (chosen + rejected) ** 2


def reward_objective(policy: Policy, cfg: RewardModelConfig) -> Objective:
    """The Bradley-Terry `Objective` over packed pairs; count = pairs. means: accuracy
    (r_c > r_r), margin (r_c - r_r), rewards/{chosen, rejected}; totals: pairs, tokens
    (non-padding), truncated_pairs."""
    if policy.lora is not None:
        raise ConfigError("objective reward trains every weight and the head: no LoRA")

    def objective(trainable: Params, frozen: Frozen, batch: Batch, rng: jax.Array) -> LossParts:
        hidden = policy.hidden(trainable, frozen, batch, rng)
        chosen, rejected = pair_rewards(policy.params(trainable, frozen), hidden, batch)
        _, _, valid = per_pair_sums(jnp.zeros(batch["segment_ids"].shape), batch)

        def total(x: jax.Array) -> jax.Array:
            return jnp.sum(x * valid)

        c, r = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
        means = {
            "accuracy": total((c > r).astype(jnp.float32)),
            "margin": total(c - r),
            "rewards/chosen": total(c),
            "rewards/rejected": total(r),
        }
        totals = {
            "pairs": jnp.sum(valid),
            "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
            "truncated_pairs": jnp.sum(batch["truncated"]).astype(jnp.float32),
        }
        return LossParts(total(pair_losses(cfg, chosen, rejected)), jnp.sum(valid), means, totals)

    return objective


def reward_start(start: Params, config: LlamaConfig, seed: int) -> Params:
    """Starting weights (`init_from`) as a reward model's: a causal LM's head goes, and a fresh
    `score` comes (a reward model's own weights pass as they are)."""
    start = {k: v for k, v in start.items() if k != "output"}
    if SCORE not in start:
        start[SCORE] = init_score_head(config, seed)
    return start


# --- a trained reward model as a reward --------------------------------------------------------


def bucket(length: int, limit: int) -> int:
    """The padded length a batch of longest sequence `length` runs at: a power of two (at
    least `MIN_BUCKET`), so few lengths are ever compiled; at most `limit`, the model's
    context (longer sequences are cut to it)."""
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), limit)


def reward_from_checkpoint(
    path: str, *, mesh: jax.sharding.Mesh | None = None, rules: str = "fsdp", batch: int = 32
) -> Callable[[Sequence[Sample]], np.ndarray]:
    """The reward model at `path` (any directory `llama_jax.load` reads) as a reward: float32
    [n] scores of `prompt_ids + completion_ids`, `batch` samples a jitted forward, padded to
    `bucket` lengths. With `mesh` the weights and rows are placed by `rules` (then `batch`
    must divide over the mesh's batch axes); without, everything runs on the first device."""
    shardings = None if mesh is None else resolver(mesh, rules)
    model = load_reward_model(path, shardings=shardings)
    config = model.config
    score = partial(sequence_rewards, config=config)
    if mesh is not None:
        score = with_rules(score, mesh, rules)
    score = jax.jit(score)

    def reward(samples: Sequence[Sample]) -> np.ndarray:
        seqs = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
        out = np.zeros(len(seqs), np.float32)
        for start in range(0, len(seqs), batch):
            chunk = seqs[start : start + batch]
            width = bucket(max(len(s) for s in chunk), config.max_seq_len)
            tokens = np.zeros((batch, width), np.int32)
            lengths = np.zeros(batch, np.int32)
            for row, ids in enumerate(chunk):
                kept = ids[-width:]  # a sequence longer than the model's context keeps its end
                tokens[row, : len(kept)], lengths[row] = kept, len(kept)
            config.check_token_ids(tokens)
            rows: dict[str, Any] = {"tokens": tokens, "lengths": lengths}
            if mesh is not None:
                rows = place_batch(rows, mesh, rules)
            scores = score(model.params, rows["tokens"], rows["lengths"])
            out[start : start + len(chunk)] = np.asarray(scores)[: len(chunk)]
        return out

    return reward
