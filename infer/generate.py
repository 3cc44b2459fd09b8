"""`generate`: the function behind `Model.generate` (token ids or text in, tokens + text out).

Prompts are run through the same `Scheduler` the server uses, so batch composition never
changes a result: a ragged batch gives each prompt the tokens it would get alone. `n`
completions of a prompt are `n` requests seeded as the server seeds its choices
(`choice_seed`), submitted together so that they share the prompt's full KV blocks.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infer.batching import Request, Scheduler, scheduler_for
from infer.engine import bucket
from infer.grammar import canonical_response_format
from infer.sampling import SamplingParams, choice_params
from infer.speculative import DEFAULT_DRAFT_TOKENS, resolve_draft


@dataclass
class Completion:
    """One prompt's result. `token_ids` end with the stop token when one ended generation
    (`finish_reason` "stop"); `text` never contains the stop token or stop string.
    `cached_tokens` of the prompt came from the prefix cache, `prefilled_tokens` were computed
    (recomputation after a preemption included)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    timings: dict[str, float]
    cached_tokens: int = 0
    prefilled_tokens: int = 0

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
            cached_tokens=request.cached_tokens,
            prefilled_tokens=request.prefilled_tokens,
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


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def complete(
    scheduler: Scheduler,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int = 1,
    seeds: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """`n` completions of each prompt (token ids) through `scheduler`, per prompt, choice i
    seeded by `choice_seed(seed, i)` where `seed` is the prompt's of `seeds` (one per prompt)
    or else `params.seed`. A prompt's `n` requests are queued one after the other, so the
    later ones find its full KV blocks in the prefix cache and compute only its last partial
    block (at least one token)."""
    _check_n(n)
    per_prompt = [params] * len(prompts)
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        per_prompt = [dataclasses.replace(params, seed=int(s)) for s in seeds]
    requests = [
        scheduler.submit(p, choice)
        for p, one in zip(prompts, per_prompt, strict=True)
        for choice in choice_params(one, n)
    ]
    scheduler.run_until_done(requests)
    out = [Completion.of(r) for r in requests]
    return [out[i : i + n] for i in range(0, len(out), n)]


def generation_scheduler(
    model: Any,
    ids: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int = 1,
    *,
    max_batch: int,
    max_len: int | None,
    **engine_options: Any,
) -> Scheduler:
    """The scheduler `generate` runs `n` completions of the prompts `ids` through: as many
    slots as completions (at most `max_batch`), a context of `max_len` or what the longest
    prompt plus `max_new_tokens` needs (a power of two)."""
    needed = max(map(len, ids)) + params.max_new_tokens
    return scheduler_for(
        model,
        slots=bucket(len(ids) * n, 1, max_batch),
        max_len=max_len or bucket(needed, 64, model.config.max_seq_len),
        max_waiting=len(ids) * n,
        **engine_options,
    )


def generate(
    model: Any,
    prompts: Any,
    *,
    n: int = 1,
    seeds: Sequence[int] | None = None,
    max_batch: int = 16,
    max_len: int | None = None,
    steps_per_call: int = 1,
    draft: Any = None,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    **sampling: Any,
) -> Completion | list[Completion] | list[list[Completion]]:
    """Generate for one prompt (text or token ids) or a list of them.

    Sampling keywords are those of `SamplingParams` (greedy by default; `stop` may be one
    string or several; `response_format` the OpenAI dict). `max_batch` bounds the decode
    slots; `max_len` the context (default: what the longest prompt plus `max_new_tokens`
    needs, rounded up to a power of two).

    With `n` = 1 the result is a `Completion` for one prompt, a list of them for a list. With
    `n` > 1 each prompt has `n` completions: a list of `n` for one prompt, a list (per prompt)
    of such lists for a list. Seeded, completion i of every prompt uses
    `choice_seed(seed, i)`: it equals the same prompt generated alone with that seed and
    `n=1`, and completion 0 keeps `seed`. `seeds` gives each prompt its own seed instead (a
    list of prompts drawing independently, as GRPO's rounds do).

    `draft` decodes speculatively (`infer.speculative`), `draft_tokens` proposals per call: a
    loaded `Model` with the same vocabulary, or "self-int8" (this model's weights in int8).
    Greedy output is unchanged; penalties and `response_format` are refused with it.
    """
    if isinstance(sampling.get("response_format"), Mapping):
        sampling["response_format"] = canonical_response_format(sampling["response_format"])
    params = SamplingParams(**sampling)
    _check_n(n)  # before it sizes the scheduler
    ids, single = encode_prompts(prompts, model.tokenizer)
    scheduler = generation_scheduler(
        model, ids, params, n, max_batch=max_batch, max_len=max_len,
        steps_per_call=steps_per_call,
        draft=resolve_draft(draft, model.config, model.params, draft_tokens),
    )  # fmt: skip
    out = complete(scheduler, ids, params, n, seeds)
    if n == 1:
        out = [choices[0] for choices in out]
    return out[0] if single else out
