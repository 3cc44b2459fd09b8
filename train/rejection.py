"""Rejection sampling: `n` sampled completions per prompt, scored by a reward, the best of each
prompt (or every one at or above a threshold) kept as SFT data
(`python -m llama_jax.post rejection-sample`).

A `prompt` row becomes `{"prompt": ..., "completion": ...}`, which `python -m llama_jax.train
--sft --data OUT` trains with the loss on the completion only (`train.data`); a `messages` row
becomes the chat with the completion as the assistant's reply. A completion that ended by
length is never kept unless asked: a cut-off answer would teach stopping mid-sentence.
Generation is passed in (`Generate`) by the CLI shim, since `train` does not import `infer`.
Beside the output, `OUT.summary.json` holds the run's reward statistics (`summarize`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.generations import write_atomic, write_jsonl
from train.prompts import PromptRow
from train.rewards import Completion, Reward, samples

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# The `n` completions of each prompt (prompt-major) of a batch of prompt ids; the second
# argument is the first prompt's index in the run, so a seeded sampler can seed each prompt by
# its place in the run and the output does not depend on the batching.
Generate = Callable[[Sequence[Sequence[int]], int], list[list[Completion]]]


@dataclass(frozen=True)
class Selection:
    """Which completions of a prompt are kept: the best (ties: the first), or with `threshold`
    every one whose reward is >= it. `min_reward` drops a prompt whose best is below it (a
    wrong answer teaches worse than none). Completions cut off by length are not candidates
    unless `keep_truncated`."""

    threshold: float | None = None
    min_reward: float | None = None
    keep_truncated: bool = False

    def keep(self, rewards: np.ndarray, truncated: np.ndarray) -> list[int]:
        """Indices of the kept completions of one prompt, in their order."""
        candidates = np.flatnonzero(~truncated | self.keep_truncated)
        if not candidates.size:
            return []
        best = candidates[np.argmax(rewards[candidates])]  # argmax: the first of equals
        if self.min_reward is not None and rewards[best] < self.min_reward:
            return []
        if self.threshold is None:
            return [int(best)]
        return [int(i) for i in candidates if rewards[i] >= self.threshold]


def sft_row(row: PromptRow, completion: str) -> dict[str, Any]:
    """The SFT line of one kept completion: prompt-completion for a `prompt` row, the chat
    answered for a `messages` row."""
    if row.prompt is not None:
        return {"prompt": row.prompt, "completion": completion}
    return {"messages": [*row.messages, {"role": "assistant", "content": completion}]}


def summary_path(out: str | Path) -> Path:
    """Where the summary of a run writing `out` goes: `OUT.summary.json`."""
    return Path(f"{out}.summary.json")


def summarize(
    rewards: Sequence[np.ndarray], kept: int, truncated: int, tokens: int, wall_s: float
) -> dict[str, Any]:
    """The statistics of a run: `rewards` holds each prompt's rewards (one per sample; at least
    one prompt).
    `best_reward_mean` averages each prompt's best sample; `pass_at_n` is the fraction of
    prompts with some reward > 0 (pass@n for 0/1 rewards). Truncated samples count here: they
    were generated, even if not kept."""
    every = np.concatenate(rewards)
    quantiles = np.quantile(every, QUANTILES)
    return {
        "prompts": len(rewards),
        "samples": int(every.size),
        "kept": kept,
        "truncated": truncated,
        "reward": {
            "mean": float(every.mean()),
            "std": float(every.std()),
            "min": float(every.min()),
            "max": float(every.max()),
            "quantiles": {
                f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)
            },
        },
        "best_reward_mean": float(np.mean([r.max() for r in rewards])),
        "pass_at_n": float(np.mean([(r > 0).any() for r in rewards])),
        "generated_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
    }


def rejection_sample(
    rows: Sequence[PromptRow],
    generate: Generate,
    reward: Reward,
    out: str | Path | None,
    selection: Selection = Selection(),
    *,
    prompts_per_batch: int = 8,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Sample every prompt of `rows` (at least one) `prompts_per_batch` at a time, with one
    `log` line per batch; score a batch's completions with one `reward` call; write the kept
    ones to `out` (JSONL) and the summary to `summary_path(out)`, both atomically (nothing
    when `out` is None: an evaluation). Returns the summary."""
    start = time.perf_counter()
    rewards: list[np.ndarray] = []
    kept: list[dict[str, Any]] = []
    truncated = tokens = 0
    for first in range(0, len(rows), prompts_per_batch):
        batch = rows[first : first + prompts_per_batch]
        choices = generate([row.ids for row in batch], first)
        scores = np.asarray(reward(samples(batch, choices)), np.float32)
        offset = 0
        for row, completions in zip(batch, choices, strict=True):
            scored = scores[offset : offset + len(completions)]
            offset += len(completions)
            ended = np.array([c.finish_reason == "length" for c in completions])
            kept += [sft_row(row, completions[i].text) for i in selection.keep(scored, ended)]
            rewards.append(scored)
            truncated += int(ended.sum())
            tokens += sum(len(c.token_ids) for c in completions)
        elapsed = time.perf_counter() - start
        log(
            f"{first + len(batch)}/{len(rows)} prompts: {len(kept)} kept, reward mean "
            f"{np.concatenate(rewards).mean():.3f}, {tokens / elapsed:.0f} tokens/s"
        )
    summary = summarize(rewards, len(kept), truncated, tokens, time.perf_counter() - start)
    if out is not None:
        write_jsonl(Path(out), kept)
        write_atomic(summary_path(out), json.dumps(summary, indent=2) + "\n")
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    r = summary["reward"]
    lines = [
        f"{summary['prompts']} prompts, {summary['samples']} samples "
        f"({summary['truncated']} cut off by length), {summary['kept']} kept",
        f"reward mean {r['mean']:.4f} std {r['std']:.4f} min {r['min']:.4f} max {r['max']:.4f}; "
        + " ".join(f"{k} {v:.4f}" for k, v in r["quantiles"].items()),
        f"best-of-n mean {summary['best_reward_mean']:.4f}; prompts with a reward > 0: "
        f"{summary['pass_at_n']:.2%}",
        f"{summary['generated_tokens']} tokens in {summary['wall_s']:.1f}s "
        f"({summary['tokens_per_s']:.0f} tokens/s)",
    ]
    return "\n".join(lines)
