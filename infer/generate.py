"""`generate`: the function behind `Model.generate` (token ids or text in, tokens + text out).

Prompts are run through the same `Scheduler` the server uses, so batch composition never
changes a result: a ragged batch gives each prompt the tokens it would get alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infer.batching import Request, Scheduler
from infer.engine import Engine, bucket
from infer.sampling import SamplingParams
from llama_jax.config import LlamaConfig

LLAMA3_BASE_VOCAB = 128000
# <|end_of_text|>, <|eom_id|>, <|eot_id|> as offsets from the end of the base vocabulary.
LLAMA3_STOP_OFFSETS = (1, 8, 9)


@dataclass
class Completion:
    """One prompt's result. `token_ids` end with the stop token when one ended generation
    (`finish_reason` "stop"); `text` never contains the stop token or stop string."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    timings: dict[str, float]

    @classmethod
    def of(cls, request: Request) -> Completion:
        asked = request.params.logprobs or request.params.top_logprobs
        return cls(
            prompt_ids=request.prompt_ids,
            token_ids=request.token_ids,
            text=request.text,
            finish_reason=request.finish_reason or "length",
            logprobs=request.logprobs if asked else None,
            top_logprobs=request.top_logprobs if request.params.top_logprobs else None,
            timings=request.timings.as_dict(len(request.token_ids)),
        )


def default_stop_ids(config: LlamaConfig, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's stop tokens; without a tokenizer, Llama 3's ids when the vocabulary has
    Llama 3's special-token block, else none."""
    if tokenizer is not None:
        return tuple(tokenizer.stop_tokens)
    if config.vocab_size >= LLAMA3_BASE_VOCAB + 256:
        return tuple(LLAMA3_BASE_VOCAB + o for o in LLAMA3_STOP_OFFSETS)
    return ()


def encode_prompts(prompts: Any, tokenizer: Any) -> tuple[list[list[int]], bool]:
    """(token id lists, whether a single prompt was given). Text is encoded with BOS."""

    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return tokenizer.encode(p, bos=True)
        ids = np.asarray(p)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"a prompt must be text or a 1-D sequence of token ids, got {p!r:.60}")
        return ids.tolist()

    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence | np.ndarray)
        and len(prompts)
        and isinstance(prompts[0], numbers.Integral)
    ):
        return [one(prompts)], True
    if not len(prompts):
        raise ValueError("no prompts given")
    return [one(p) for p in prompts], False


def generate(
    model: Any,
    prompts: Any,
    *,
    max_batch: int = 16,
    max_len: int | None = None,
    steps_per_call: int = 1,
    **sampling: Any,
) -> Completion | list[Completion]:
    """Generate for one prompt (text or token ids) or a list of them.

    Sampling keywords are those of `SamplingParams` (greedy by default; `stop` may be one
    string or several). `max_batch` bounds the decode slots; `max_len` the context (default:
    what the longest prompt plus `max_new_tokens` needs, rounded up to a power of two).
    """
    params = SamplingParams(**sampling)
    ids, single = encode_prompts(prompts, model.tokenizer)
    config = model.config
    needed = max(map(len, ids)) + params.max_new_tokens
    engine = Engine(
        config,
        model.params,
        slots=bucket(len(ids), 1, max_batch),
        max_len=max_len or bucket(needed, 64, config.max_seq_len),
        steps_per_call=steps_per_call,
        mesh=getattr(model, "mesh", None),
    )
    scheduler = Scheduler(
        engine,
        tokenizer=model.tokenizer,
        default_stop_ids=default_stop_ids(config, model.tokenizer),
        max_waiting=len(ids),
    )
    requests = [scheduler.submit(p, params) for p in ids]
    scheduler.run_until_done(requests)
    out = [Completion.of(r) for r in requests]
    return out[0] if single else out
