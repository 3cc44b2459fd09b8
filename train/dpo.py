"""Direct preference optimisation: the DPO objective over packed preference pairs, and the
first pass of `--precompute-reference` (the reference model's log-probs written beside the data).

Losses follow TRL 1.16's `DPOTrainer` (`loss_type`), on the log-ratios
d_c = logp(chosen) - ref_logp(chosen), d_r likewise (sums over completion tokens), D = d_c - d_r:
  sigmoid   -logsigmoid(beta D); with `label_smoothing` e > 0 the conservative DPO of Mitchell
            (2023): -(1 - e) logsigmoid(beta D) - e logsigmoid(-beta D). (TRL 1.16 ignores
            label smoothing for `sigmoid`; with e = 0 the two agree.)
  robust    TRL's robust DPO (Chowdhury et al. 2024), e = the label flip rate in [0, 0.5).
  ipo       (d_c / n_c - d_r / n_r - 1 / (2 beta))^2, n = completion tokens, as TRL normalises.
The reference is the LoRA base (adapters off), a frozen copy of the model, or sums precomputed
into the data (`ref_logps`), which frees the memory and time of a second model in training.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.lora import LoraConfig
from llama_jax.model import Params, output_logits
from train.preference import (
    REF_KEYS,
    WHERE,
    PreferenceSource,
    max_pairs,
    pair_example,
    per_pair_sums,
    segment_sums,
    split_halves,
    tokenize_pair,
)
from train.step import Batch, Frozen, LossParts, Objective, Policy, chunked_sum

LOSSES = ("sigmoid", "robust", "ipo")
REFERENCE = "reference"  # the key of the frozen reference copy in `frozen`
REFERENCES = ("auto", "frozen", "precomputed")


@dataclass(frozen=True)
class DPOConfig:
    """DPO settings: `beta` scales the implicit reward (IPO's regulariser tau = beta);
    `reference` picks the reference policy: "auto" = the LoRA base with LoRA, else a frozen
    copy (`frozen["reference"]`); "frozen"; "precomputed" = the batch's `ref_logps`."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--dpo-loss {self.loss!r}: must be one of {', '.join(LOSSES)}")
        if self.reference not in REFERENCES:
            raise ConfigError(
                f"--dpo-reference {self.reference!r}: must be one of {', '.join(REFERENCES)}"
            )
        if not self.beta > 0:
            raise ConfigError(f"--dpo-beta {self.beta}: must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--dpo-label-smoothing {self.label_smoothing}: must be in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("--dpo-label-smoothing: the ipo loss takes no label smoothing")

    def uses_frozen_copy(self, lora: LoraConfig | None) -> bool:
        """Whether `frozen["reference"]` must hold reference weights (with `lora`, "auto"
        switches the adapters off instead)."""
        return self.reference == "frozen" or (self.reference == "auto" and lora is None)


def completion_logps(
    params: Params, hidden: jax.Array, batch: Batch, config: LlamaConfig, loss_chunks: int = 1
) -> jax.Array:
    """Per-segment sums [B, 2P + 1] of the completion targets' log-probs under the head applied
    to `hidden`; the head runs over `loss_chunks` slices (see `chunked_sum`)."""
    pairs = max_pairs(hidden.shape[1])

    def sums(h: jax.Array, targets: jax.Array, mask: jax.Array, seg: jax.Array) -> jax.Array:
        logits = output_logits(params, h, config=config)
        logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return segment_sums(logp * mask, seg, pairs)

    mask = batch["loss_mask"].astype(jnp.float32)
    arrays = (hidden, batch["targets"], mask, batch["segment_ids"])
    return chunked_sum(sums, arrays, loss_chunks)


def pair_losses(
    cfg: DPOConfig,
    logps: tuple[jax.Array, jax.Array],
    ref: tuple[jax.Array, jax.Array],
    lengths: tuple[jax.Array, jax.Array],
) -> jax.Array:
    """Per-pair loss from (chosen, rejected) policy sums, reference sums and completion lengths."""
    chosen, rejected = logps[0] - ref[0], logps[1] - ref[1]
    beta, e = cfg.beta, cfg.label_smoothing
    if cfg.loss == "ipo":
        n_c, n_r = (jnp.maximum(n, 1.0) for n in lengths)
        return (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2
    fit, flip = (
        -jax.nn.log_sigmoid(beta * (chosen - rejected)),
        -jax.nn.log_sigmoid(-beta * (chosen - rejected)),
    )
    if cfg.loss == "robust":
        return ((1 - e) * fit - e * flip) / (1 - 2 * e)
    return (1 - e) * fit + e * flip


def _reference_sums(
    policy: Policy,
    cfg: DPOConfig,
    loss_chunks: int,
) -> Callable[[Params, Frozen, Batch], jax.Array]:
    """`fn(trainable, frozen, batch)` -> the reference's per-segment completion sums."""
    if cfg.reference == "precomputed":

        def precomputed(trainable: Params, frozen: Frozen, batch: Batch) -> jax.Array:
            if "ref_logps" not in batch:
                raise ConfigError(
                    "--dpo-reference precomputed: the data has no ref_chosen_logps / "
                    "ref_rejected_logps (write them with --precompute-reference first)"
                )
            pairs = max_pairs(batch["tokens"].shape[1])
            return segment_sums(batch["ref_logps"].astype(jnp.float32), batch["segment_ids"], pairs)

        return precomputed
    if cfg.uses_frozen_copy(policy.lora):
        whole = Policy(policy.config)

        def frozen_copy(trainable: Params, frozen: Frozen, batch: Batch) -> jax.Array:
            if REFERENCE not in frozen:
                raise ConfigError('DPO with a frozen reference: frozen["reference"] is missing')
            params = frozen[REFERENCE]
            hidden = whole.hidden(params, frozen, batch)
            return completion_logps(params, hidden, batch, policy.config, loss_chunks)

        return frozen_copy

    def adapters_off(trainable: Params, frozen: Frozen, batch: Batch) -> jax.Array:
        hidden = policy.hidden(trainable, frozen, batch, adapted=False)
        params = policy.params(trainable, frozen)
        return completion_logps(params, hidden, batch, policy.config, loss_chunks)

    return adapters_off


def dpo_objective(policy: Policy, cfg: DPOConfig, loss_chunks: int = 1) -> Objective:
    """The DPO `Objective` over packed pairs (`train.preference` batches): one policy forward
    scores both halves of every pair; count = pairs. means: rewards/{chosen, rejected, margins,
    accuracies} (reward = beta * log-ratio, as TRL logs), logps/{chosen, rejected}; totals:
    pairs, tokens (non-padding), truncated_pairs."""
    reference = _reference_sums(policy, cfg, loss_chunks)

    def objective(trainable: Params, frozen: Frozen, batch: Batch, rng: jax.Array) -> LossParts:
        hidden = policy.hidden(trainable, frozen, batch, rng)
        params = policy.params(trainable, frozen)
        logps = split_halves(completion_logps(params, hidden, batch, policy.config, loss_chunks))
        ref = split_halves(jax.lax.stop_gradient(reference(trainable, frozen, batch)))
        n_c, n_r, valid = per_pair_sums(batch["loss_mask"].astype(jnp.float32), batch)
        losses = pair_losses(cfg, logps, ref, (n_c, n_r))
        rewards = [
            jax.lax.stop_gradient(cfg.beta * (p - r)) for p, r in zip(logps, ref, strict=True)
        ]
        pairs = jnp.sum(valid)

        def total(x: jax.Array) -> jax.Array:
            return jnp.sum(x * valid)

        means = {
            "rewards/chosen": total(rewards[0]),
            "rewards/rejected": total(rewards[1]),
            "rewards/margins": total(rewards[0] - rewards[1]),
            "rewards/accuracies": total((rewards[0] > rewards[1]).astype(jnp.float32)),
            "logps/chosen": total(jax.lax.stop_gradient(logps[0])),
            "logps/rejected": total(jax.lax.stop_gradient(logps[1])),
        }
        totals = {
            "pairs": pairs,
            "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
            "truncated_pairs": jnp.sum(batch["truncated"]).astype(jnp.float32),
        }
        return LossParts(total(losses), pairs, means, totals)

    return objective


# --- precomputed reference -------------------------------------------------------------------


def _pair_rows(
    source: PreferenceSource, tokenizer: Any, seq_len: int, batch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch` rows, one pair per row in file order (the last batch padded with
    empty rows), in the layout `make_preference_dataset` packs: segments 1 and 2."""
    for start in range(0, len(source), batch):
        rows = {
            k: np.zeros((batch, seq_len), np.int32)
            for k in ("tokens", "targets", "positions", "segment_ids")
        }
        rows["loss_mask"] = np.zeros((batch, seq_len), np.float32)
        for r, index in enumerate(range(start, min(start + batch, len(source)))):
            ex = pair_example(tokenize_pair(source[index], tokenizer), seq_len)
            n = len(ex["tokens"])
            for key in ("tokens", "targets", "loss_mask"):
                rows[key][r, :n] = ex[key]
            rows["positions"][r, :n] = ex["own_positions"]
            rows["segment_ids"][r, :n] = 1 + ex["rejected"]
        yield rows


def reference_logps(
    params: Params,
    config: LlamaConfig,
    paths: Sequence[str],
    out_path: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    batch: int,
) -> Path:
    """Score every pair of `paths` under the reference `params` (jitted, `batch` pairs a call,
    each cut to `seq_len` as training cuts it) and write the lines, in order, to `out_path`
    with `ref_chosen_logps` / `ref_rejected_logps` added. Written to a temporary file and
    renamed, so an interrupted pass leaves no half file that training would read."""
    source = PreferenceSource(paths)
    whole = Policy(config)

    @jax.jit
    def score(params: Params, rows: Batch) -> tuple[jax.Array, jax.Array]:
        hidden = whole.hidden(params, {}, rows)
        sums = completion_logps(params, hidden, rows, config)
        return sums[:, 1], sums[:, 2]

    scored = [score(params, rows) for rows in _pair_rows(source, tokenizer, seq_len, batch)]
    chosen, rejected = (np.concatenate([np.asarray(s[i]) for s in scored]) for i in (0, 1))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        try:
            for i in range(len(source)):
                line = {k: v for k, v in source[i].items() if k != WHERE}
                line.update(zip(REF_KEYS, (float(chosen[i]), float(rejected[i])), strict=True))
                f.write(json.dumps(line) + "\n")
        except BaseException:
            Path(f.name).unlink()
            raise
    os.replace(f.name, out)
    return out
