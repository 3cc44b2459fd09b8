"""Prompts for sampling-based post-training (rejection sampling, GRPO): what the policy is asked,
and the reference answer a verifiable reward checks against.

A prompts file is JSONL, one object per line: `prompt` (text, continued as is, after
`<|begin_of_text|>`) or `messages` (a chat, answered after an open assistant header), and an
optional `answer` (the reference for `exact`/`regex` rewards). `builtin:arithmetic[:SPLIT]` is
the built-in corpus's facts as prompts (`7+8=`) with their answers; SPLIT is `all` (default),
`train` or `heldout` (`train.corpus.split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain

from llama_jax.chat import encode_dialog
from train import corpus
from train.data import DataConfig, DataError, check_shards
from train.generations import GenerationsError, read_jsonl

BUILTIN_PREFIX = "builtin:arithmetic"


@dataclass(frozen=True)
class PromptRow:
    """One prompt: where it came from (FILE:LINE), its ids, and what the output files need
    (the text or messages it was given as, the reference answer)."""

    where: str
    ids: tuple[int, ...]
    prompt: str | None
    messages: tuple[dict[str, Any], ...] | None
    answer: str | None

    @property
    def text(self) -> str:
        """The prompt as a reward reads it: the text, or the last message's content."""
        if self.prompt is not None:
            return self.prompt
        return str(self.messages[-1].get("content", "")) if self.messages else ""


def builtin_split(spec: str) -> str | None:
    """The arithmetic split a `builtin:arithmetic[:SPLIT]` spec names, or None for a file."""
    if spec == BUILTIN_PREFIX:
        return "all"
    if spec.startswith(BUILTIN_PREFIX + ":"):
        return spec[len(BUILTIN_PREFIX) + 1 :]
    return None


def read_prompts(spec: str, tokenizer: Any) -> list[PromptRow]:
    """Every prompt of a prompts file or of `builtin:arithmetic[:SPLIT]`, tokenized; a bad line
    raises DataError naming its FILE:LINE."""
    split = builtin_split(spec)
    if split is not None:
        try:
            facts = corpus.split(split)
        except ValueError as e:
            raise DataError(f"--prompts {spec}: {e}") from None
        return [
            PromptRow(f"{spec}:{i + 1}", tuple(tokenizer.encode(q, bos=True)), q, None, a)
            for i, (q, a) in enumerate(facts)
        ]
    try:
        rows = [_row(obj, where, tokenizer) for where, obj in read_jsonl(spec)]
    except GenerationsError as e:
        raise DataError(str(e)) from None
    if not rows:
        raise DataError(f"--prompts {spec}: no prompts in the file")
    return rows


def _row(obj: Any, where: str, tokenizer: Any) -> PromptRow:
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise DataError(f"{where}: expected an object with either 'prompt' or 'messages'")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise DataError(f"{where}: 'answer' must be text or a number, got {answer!r:.40}")
    answer = None if answer is None else str(answer)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise DataError(f"{where}: 'prompt' must be non-empty text")
        ids = tokenizer.encode(obj["prompt"], bos=True)
        return PromptRow(where, tuple(ids), obj["prompt"], None, answer)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of chat messages")
    try:
        ids = encode_dialog(tokenizer, messages, add_generation_prompt=True)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DataError(f"{where}: {e}") from None
    return PromptRow(where, tuple(ids), None, tuple(messages), answer)


def longest(rows: Sequence[PromptRow]) -> int:
    """The longest prompt, in ids."""
    return max(len(r.ids) for r in rows)


def prompt_batches(
    rows: Sequence[PromptRow],
    per_step: int,
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """One data shard's endless stream of `per_step // shard_count` prompts per round: rows
    split over shards, shuffled with `seed` (a new order each epoch). A grain dataset, so its
    position checkpoints with the run and a resumed run asks the same prompts."""
    check_shards(DataConfig(batch=per_step), len(rows), "prompts", shard_count)
    return (
        grain.MapDataset.range(len(rows))[shard_index::shard_count]
        .shuffle(seed=seed)
        .repeat()
        .map(lambda i: rows[i])
        .to_iter_dataset()
        .batch(per_step // shard_count, batch_fn=list)
    )
