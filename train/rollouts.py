"""The GRPO loop: the inference engine samples from the trainer's own weights, the trainer
updates them, round after round (`python -m llama_jax.post grpo`).

A round (one loop step) takes the data stream's next prompts, hands the sampler the policy's
weights as one jitted call makes them on the mesh (cast to the compute dtype, LoRA adapters
merged, resharded to the engine's layout), scores the completions with the reward, builds the
round's batch (`train.grpo.round_batch`), computes its fixed log-probs once and takes
`num_iterations` updates on it. Nothing passes through the host but token ids,
log-probs and rewards. The sampler comes from the CLI shim (the engine lives in `infer`, which
`train` does not import); it is any `Sampler`.

Resuming is exact: the prompts come from the checkpointed data position, each prompt's seed is
a function of the run seed, the round and its place in the round, and the weights are the
checkpoint's, so a resumed round samples what the first run sampled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.lora import merge
from llama_jax.model import Params, param_shapes
from sharding.place import tree_shardings
from sharding.rules import with_rules
from train.config import TrainConfig, TrainConfigError
from train.grpo import GRPOConfig, build_scorer, group_advantages, round_batch
from train.loop import RunResult, Trainer, run_trainer, setup
from train.prompts import PromptRow, longest, read_prompts
from train.rewards import Completion, Reward, parse_reward, samples
from train.step import BASE, Frozen
from train.tokenizers import load_tokenizer

# The engine's sharding rules (the sampler's `Engine` default): weights split over `tensor`,
# replicated over the data axes.
ENGINE_RULES = "infer_tp"
SEQ_MULTIPLE = 8  # round lengths are padded to a multiple of this: few compiles, little padding


class Sampler(Protocol):
    """`n` completions of each prompt, prompt i's choice j seeded by (seeds[i], j), from a
    model given by its config and weights (on `mesh`, or unsharded when None)."""

    def __call__(
        self,
        config: LlamaConfig,
        weights: Params,
        mesh: jax.sharding.Mesh | None,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        n: int,
        **sampling: Any,
    ) -> list[list[Completion]]: ...


def round_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the `index`-th prompt of round `step`: a hash of the three, so
    rounds and prompts draw independently and a resumed round draws the same."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def round_length(cfg: GRPOConfig, rows: Sequence[PromptRow], loss_chunks: int = 1) -> int:
    """The batch's sequence length: the longest prompt and a full completion, less the last
    id (it is only a target), rounded up to a multiple of `SEQ_MULTIPLE` and `loss_chunks`."""
    n = longest(rows) + cfg.max_new_tokens - 1
    multiple = math.lcm(SEQ_MULTIPLE, loss_chunks)
    return -(-n // multiple) * multiple


@dataclass
class GRPOTrainer(Trainer):
    """A `Trainer` whose step is a GRPO round; `steps_done` counts rounds."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sampler: Sampler | None = None
    reward: Reward | None = None
    score_fn: Any = None
    weights_fn: Any = None
    seq_len: int = 0
    eval_rows: Sequence[PromptRow] = ()

    @property
    def steps_done(self) -> int:
        return int(self.state.step) // self.grpo.num_iterations

    def sample(
        self, rows: Sequence[PromptRow], seeds: Sequence[int], n: int, **sampling: Any
    ) -> list[list[Completion]]:
        weights = self.weights_fn(self.state.params, self.frozen)
        prompts = [r.ids for r in rows]
        return self.sampler(
            self.model_config, weights, self.mesh, self.tokenizer, prompts, seeds, n, **sampling
        )

    def evaluate(self) -> float:
        """Mean reward of greedy answers to the eval prompts."""
        groups = self.sample(
            self.eval_rows,
            [0] * len(self.eval_rows),
            1,
            max_new_tokens=self.grpo.max_new_tokens,
            temperature=0.0,
        )
        return float(np.mean(self.reward(samples(self.eval_rows, groups))))

    def step(self, step: int) -> dict[str, Any]:
        """Round `step`: sample, score, update `num_iterations` times. The metrics come back as
        host floats (generation already waited for the device)."""
        g = self.grpo
        rows = next(self.data_iter)
        start = time.perf_counter()
        seeds = [round_seed(self.cfg.seed, step, i) for i in range(len(rows))]
        groups = self.sample(rows, seeds, g.num_generations, **g.sampling())
        sampled = time.perf_counter()
        rewards = self.reward(samples(rows, groups))
        advantages = group_advantages(rewards, g.num_generations, g.scale_rewards)
        flat = [c for group in groups for c in group]
        batch = self.place(round_batch([r.ids for r in rows], flat, advantages, self.seq_len))
        batch |= self.score_fn(self.state.params, self.frozen, batch)
        updates = []
        for _ in range(g.num_iterations):
            self.state, metrics = self.step_fn(self.state, batch, self.frozen)
            updates.append(metrics)
        updates = jax.device_get(updates)
        done = time.perf_counter()
        out = _round_metrics(updates, rewards, flat, sampled - start, done - sampled)
        if self.eval_rows and g.eval_every and step % g.eval_every == 0:
            out["eval_reward"] = self.evaluate()
        return out


def _round_metrics(
    updates: list[dict[str, Any]],
    rewards: np.ndarray,
    completions: Sequence[Completion],
    sample_s: float,
    train_s: float,
) -> dict[str, float]:
    """A round's metrics: the first update's loss and totals (the policy that sampled), the
    last update's gradient norm and lr, the rewards, and both halves' throughput."""
    first, last = updates[0], updates[-1]
    n_tok = max(float(first["completion_tokens"]), 1.0)
    generated = sum(len(c.token_ids) for c in completions)
    trained = sum(float(u["tokens"]) for u in updates)
    return {
        "loss": float(first["loss"]),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]),
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "kl": float(first["kl_sum"]) / n_tok,
        "clip_fraction": float(np.mean([u["clipped_sum"] / n_tok for u in updates])),
        "ratio_mean": float(last["ratio_sum"]) / n_tok,
        "logprob_gap": float(first["logprob_gap_sum"]) / n_tok,
        "completion_length": generated / len(completions),
        "stopped_fraction": float(np.mean([c.finish_reason == "stop" for c in completions])),
        "generated_tokens_per_sec": generated / sample_s if sample_s > 0 else 0.0,
        "train_tokens_per_sec": trained / train_s if train_s > 0 else 0.0,
        "tokens": trained,
    }


def _policy_weights(t: Trainer) -> Any:
    """`fn(trainable, frozen)` -> the weights the sampler runs, made on the device once per
    round: the trained tree (or the LoRA base with the adapters merged) in the compute dtype,
    resharded from the trainer's layout to the engine's (`ENGINE_RULES`), so that decoding
    reads local shards instead of gathering FSDP shards at every token."""
    config, lora = t.model_config, t.policy.lora

    def weights(trainable: Params, frozen: Frozen) -> Params:
        params = trainable if lora is None else merge(frozen[BASE], trainable, lora=lora)
        return jax.tree.map(lambda w: w.astype(config.compute_dtype), params)

    shardings = tree_shardings(param_shapes(config), config, t.mesh, ENGINE_RULES)
    return jax.jit(weights, out_shardings=shardings)


def _round_config(cfg: TrainConfig, rows: Sequence[PromptRow]) -> TrainConfig:
    """The run's config with the data section a GRPO round implies: a batch of one row per
    completion, of the round's length."""
    g = cfg.grpo
    seq_len = round_length(g, rows, cfg.loss_chunks)
    data = dataclasses.replace(cfg.data, batch=g.rows, seq_len=seq_len)
    return dataclasses.replace(cfg, objective="grpo", data=data)


def grpo_trainer(cfg: TrainConfig, sampler: Sampler, devices: list[Any] | None = None):
    """A GRPO run ready to step: `train.loop.setup` for the `grpo` objective, plus the
    sampler, the reward, the jitted scorer and the eval prompts."""
    if jax.process_count() > 1:
        raise TrainConfigError(
            "grpo: one process drives the engine and the trainer; run it on one host's mesh"
        )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    rows = read_prompts(cfg.grpo.prompts, tokenizer)
    cfg = _round_config(cfg, rows)
    t = setup(cfg, devices)
    needed = longest(rows) + cfg.grpo.max_new_tokens
    if needed > t.model_config.max_seq_len:
        raise TrainConfigError(
            f"grpo: the longest prompt ({longest(rows)} ids) plus max_new_tokens "
            f"({cfg.grpo.max_new_tokens}) exceed the model's max_seq_len "
            f"{t.model_config.max_seq_len}"
        )
    score = build_scorer(t.policy, cfg.grpo, cfg.loss_chunks)
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(Trainer)}
    return GRPOTrainer(
        **fields,
        grpo=cfg.grpo,
        sampler=sampler,
        reward=parse_reward(cfg.grpo.reward, mesh=t.mesh, rules=cfg.rules),
        score_fn=jax.jit(with_rules(score, t.mesh, cfg.rules)),
        weights_fn=_policy_weights(t),
        seq_len=cfg.data.seq_len,
        eval_rows=read_prompts(cfg.grpo.eval_prompts, tokenizer) if cfg.grpo.eval_prompts else (),
    )


def run_grpo(
    cfg: TrainConfig, sampler: Sampler, devices: list[Any] | None = None
) -> tuple[RunResult, dict[str, float]]:
    """Train with GRPO for `cfg.steps` rounds (counting those before a resume). Returns the
    result and the eval prompts' mean greedy reward before and after (empty without them; no
    "after" for a run a signal stopped)."""
    t = grpo_trainer(cfg, sampler, devices)
    scores = {}
    if t.eval_rows:
        scores["before"] = t.evaluate()
        print(f"eval_reward before this run: {scores['before']:.4f}", flush=True)
    result = run_trainer(t)
    if t.eval_rows and not result.preempted:
        scores["after"] = t.evaluate()
    return result, scores
