"""`generate`: the function behind `Model.generate` (token ids or text in, tokens + text out).

Prompts are run through the same `Scheduler` the server uses, so batch composition never
changes a result: a ragged batch gives each prompt the tokens it would get alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infer.batching import Request, scheduler_for
from infer.engine import bucket
from infer.grammar import canonical_response_format
from infer.sampling import SamplingParams


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
    string or several; `response_format` the OpenAI dict). `max_batch` bounds the decode
    slots; `max_len` the context (default: what the longest prompt plus `max_new_tokens`
    needs, rounded up to a power of two).
    """
    if isinstance(sampling.get("response_format"), Mapping):
        sampling["response_format"] = canonical_response_format(sampling["response_format"])
    params = SamplingParams(**sampling)
    ids, single = encode_prompts(prompts, model.tokenizer)
    needed = max(map(len, ids)) + params.max_new_tokens
    scheduler = scheduler_for(
        model,
        slots=bucket(len(ids), 1, max_batch),
        max_len=max_len or bucket(needed, 64, model.config.max_seq_len),
        max_waiting=len(ids),
        steps_per_call=steps_per_call,
    )
    requests = [scheduler.submit(p, params) for p in ids]
    scheduler.run_until_done(requests)
    out = [Completion.of(r) for r in requests]
    return out[0] if single else out
