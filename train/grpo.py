"""Group relative policy optimisation: the objective, the group advantages and the batch of
one generation round (the loop that samples and updates is `train.rollouts`).

Each round samples `num_generations` completions of each of `prompts_per_step` prompts from the
current policy, scores them with a reward (`train.rewards`), and turns each group's rewards into
advantages A = (r - mean) / (std + 1e-4) (`scale_rewards`: "group", "batch" or "none"). The
policy then takes `num_iterations` updates on the round, each minimising TRL 1.16's GRPO loss per
completion token t (with ratio rho = exp(logp - logp_old)):

  -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL_k3,
  KL_k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1

aggregated by `loss_type`: "dapo" and "bnpo" (sum over the round's completion tokens / their
count), "grpo" (each completion's token mean, averaged over completions), "dr_grpo" (sum /
(completions x max_new_tokens)). Log-probs are of the logits divided by the sampling temperature,
as TRL computes them. With one iteration logp_old is logp itself (stopped gradient); with more,
the round's log-probs before its first update. The reference is the LoRA base (adapters off) or,
training every weight, a frozen copy of the starting weights; `beta` 0 needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.lora import LoraConfig
from llama_jax.model import Params, output_logits
from train.dpo import REFERENCE
from train.step import Batch, Frozen, LossParts, Objective, Policy, chunked_map, chunked_sum

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group of equal rewards gets zero advantages, not a division by zero


@dataclass(frozen=True)
class GRPOConfig:
    """The `grpo:` section. `prompts` and `reward` are specs of `train.prompts.read_prompts`
    and `train.rewards.parse_reward`; `eval_prompts` (empty: none) are answered greedily every
    `eval_every` rounds (their mean reward logged as `eval_reward`) and at the start and end.
    `epsilon_high` 0 means `epsilon` (symmetric clipping)."""

    prompts: str = "builtin:arithmetic:train"
    reward: str = "arithmetic"
    num_generations: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float = 0.0
    num_iterations: int = 1
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    eval_prompts: str = ""
    eval_every: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("num_generations", self.num_generations >= 2, "an integer >= 2 (a group)"),
            ("prompts_per_step", self.prompts_per_step >= 1, "an integer >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature > 0, "a number > 0 (GRPO samples)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("beta", self.beta >= 0, "a number >= 0"),
            ("epsilon", 0 < self.epsilon < 1, "a number in (0, 1)"),
            ("epsilon_high", self.epsilon_high >= 0, "a number >= 0 (0: epsilon)"),
            ("num_iterations", self.num_iterations >= 1, "an integer >= 1"),
            ("loss_type", self.loss_type in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
            ("scale_rewards", self.scale_rewards in SCALES, f"one of {', '.join(SCALES)}"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0 (0: the start and end only)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"grpo.{name} {getattr(self, name)!r}: must be {expected}")

    @property
    def clip_high(self) -> float:
        return self.epsilon_high or self.epsilon

    @property
    def rows(self) -> int:
        """Completions per round: the train batch."""
        return self.prompts_per_step * self.num_generations

    def uses_frozen_copy(self, lora: LoraConfig | None) -> bool:
        """Whether `frozen["reference"]` must hold the starting weights (with LoRA the
        reference is the base with the adapters off)."""
        return self.beta > 0 and lora is None

    def sampling(self) -> dict[str, Any]:
        """The engine's sampling settings of a round (`infer.sampling.SamplingParams` fields)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "logprobs": True,
        }


def group_advantages(rewards: np.ndarray, group: int, scale: str) -> np.ndarray:
    """Advantages of rewards [prompts x group] (prompt-major): reward minus its group's mean,
    divided by the group's (or the batch's) unbiased std + 1e-4, as TRL does."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        centred /= r.std(axis=1, ddof=1, keepdims=True) + STD_EPS
    elif scale == "batch":
        centred /= (r.std(ddof=1) if r.size > 1 else 0.0) + STD_EPS
    return centred.reshape(-1).astype(np.float32)


def round_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Any],
    advantages: np.ndarray,
    seq_len: int,
) -> dict[str, np.ndarray]:
    """One row per completion (prompt-major, `completions[i]` of `prompts[i // group]`):
    prompt + completion as inputs and next-token targets, the loss on the completion's tokens
    (its stop token included, as TRL's completion mask), the engine's log-probs of them
    (`sampled_logps`) and the row's advantage (on every position: all batch arrays are
    [rows, seq_len], placed alike)."""
    group = len(completions) // len(prompts)
    rows = len(completions)
    out = {
        k: np.zeros((rows, seq_len), np.int32)
        for k in ("tokens", "targets", "positions", "segment_ids")
    }
    out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    out["sampled_logps"] = np.zeros((rows, seq_len), np.float32)
    for i, c in enumerate(completions):
        prompt, gen = list(prompts[i // group]), list(c.token_ids)
        ids = prompt + gen
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"a prompt and its completion span {n} positions > {seq_len}")
        out["tokens"][i, :n] = ids[:-1]
        out["targets"][i, :n] = ids[1:]
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
        first = len(prompt) - 1  # the position whose target is the first generated token
        out["loss_mask"][i, first:n] = 1.0
        out["sampled_logps"][i, first:n] = c.logprobs[: len(gen)]
    out["advantages"] = np.repeat(np.asarray(advantages, np.float32)[:, None], seq_len, axis=1)
    return out


def token_logps(
    params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    config: LlamaConfig,
    temperature: float,
    loss_chunks: int = 1,
) -> jax.Array:
    """float32 [B, T]: log-probs of `targets` under the head applied to `hidden`, logits
    divided by `temperature`."""

    def logps(h: jax.Array, t: jax.Array) -> jax.Array:
        logits = output_logits(params, h, config=config) / temperature
        return -optax.softmax_cross_entropy_with_integer_labels(logits, t)

    return chunked_map(logps, (hidden, targets), loss_chunks)


def reference_policy(policy: Policy) -> tuple[Policy, Callable[[Params, Frozen], Params]]:
    """The reference's policy and its weights: the LoRA base (adapters off, in `frozen`) or the
    frozen starting copy `frozen["reference"]`."""
    if policy.lora is not None:
        return policy, lambda trainable, frozen: trainable
    return Policy(policy.config), lambda trainable, frozen: frozen[REFERENCE]


def build_scorer(
    policy: Policy, cfg: GRPOConfig, loss_chunks: int = 1
) -> Callable[[Params, Frozen, Batch], dict[str, jax.Array]]:
    """`fn(trainable, frozen, batch)` -> the round's fixed log-probs, [B, T] each: `old_logps`
    (the policy before the round's updates; only with num_iterations > 1) and `ref_logps` (the
    reference; only with beta > 0). Pure; jit it."""
    ref_policy, ref_weights = reference_policy(policy)

    def logps(p: Policy, trainable: Params, frozen: Frozen, batch: Batch, adapted: bool):
        hidden = p.hidden(trainable, frozen, batch, adapted=adapted)
        params = p.params(trainable, frozen)
        return token_logps(params, hidden, batch["targets"], p.config, cfg.temperature, loss_chunks)

    def score(trainable: Params, frozen: Frozen, batch: Batch) -> dict[str, jax.Array]:
        out = {}
        if cfg.num_iterations > 1:
            out["old_logps"] = logps(policy, trainable, frozen, batch, True)
        if cfg.beta > 0:
            out["ref_logps"] = logps(
                ref_policy, ref_weights(trainable, frozen), frozen, batch, False
            )
        return jax.tree.map(jax.lax.stop_gradient, out)

    return score


def _loss_weights(cfg: GRPOConfig, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-token weights of the loss, the count the summed loss is divided by) for
    `loss_type` (see the module docstring)."""
    if cfg.loss_type == "grpo":
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
        return mask / lengths, jnp.float32(mask.shape[0])
    if cfg.loss_type == "dr_grpo":
        return mask, jnp.float32(mask.shape[0] * cfg.max_new_tokens)
    return mask, jnp.sum(mask)


def grpo_objective(policy: Policy, cfg: GRPOConfig, loss_chunks: int = 1) -> Objective:
    """The GRPO loss of a round's batch (`round_batch` plus `build_scorer`'s log-probs).

    totals: `kl_sum` (k3 over completion tokens), `clipped_sum` (tokens whose ratio left the
    clip region on the side the advantage pushes), `ratio_sum`, `logprob_gap_sum` (|engine
    log-prob - this log-prob|: 0 up to rounding when both run the same weights at temperature
    1), `completion_tokens`, `tokens`; the loop divides them into means."""
    low, high = 1.0 - cfg.epsilon, 1.0 + cfg.clip_high

    def per_token(logp, adv, old, ref, sampled):
        old = jax.lax.stop_gradient(logp) if old is None else old
        ratio = jnp.exp(logp - old)
        loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
        kl = jnp.zeros_like(logp)
        if ref is not None:
            kl = jnp.exp(ref - logp) - (ref - logp) - 1.0
            loss = loss + cfg.beta * kl
        clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
        gap = jnp.abs(sampled - jax.lax.stop_gradient(logp))
        return loss, kl, clipped.astype(jnp.float32), jax.lax.stop_gradient(ratio), gap

    def objective(trainable: Params, frozen: Frozen, batch: Batch, rng: jax.Array) -> LossParts:
        mask = batch["loss_mask"].astype(jnp.float32)
        weights, count = _loss_weights(cfg, mask)
        hidden = policy.hidden(trainable, frozen, batch, rng)
        params = policy.params(trainable, frozen)
        adv = batch["advantages"]
        old, ref = batch.get("old_logps"), batch.get("ref_logps")
        extra = tuple(x for x in (old, ref) if x is not None)

        def sums(h, targets, m, w, a, sampled, *fixed):
            logits = output_logits(params, h, config=policy.config) / cfg.temperature
            logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            it = iter(fixed)
            o = next(it) if old is not None else None
            r = next(it) if ref is not None else None
            loss, kl, clipped, ratio, gap = per_token(logp, a, o, r, sampled)
            return {
                "loss": jnp.sum(loss * w),
                "kl_sum": jnp.sum(kl * m),
                "clipped_sum": jnp.sum(clipped * m),
                "ratio_sum": jnp.sum(ratio * m),
                "logprob_gap_sum": jnp.sum(gap * m),
            }

        arrays = (hidden, batch["targets"], mask, weights, adv, batch["sampled_logps"], *extra)
        s = chunked_sum(sums, arrays, loss_chunks)
        tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
        totals = {k: v for k, v in s.items() if k != "loss"}
        totals |= {"completion_tokens": jnp.sum(mask), "tokens": tokens}
        return LossParts(s["loss"], count, {}, totals)

    return objective
