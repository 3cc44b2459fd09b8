"""OpenAI API shapes: validated request bodies and the JSON pieces of responses.

Requests are pydantic models, so a wrong type or an out-of-range value becomes a 400 with the
field named. Fields may be null (meaning: the default). `top_k`, `min_p`, `stop_token_ids` and
`repetition_penalty` are extensions (vLLM spells them the same way).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infer.batching import Request
from infer.grammar import canonical_response_format
from infer.sampling import (
    MAX_BIAS,
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

MAX_N = 16  # choices per prompt; each is a scheduler request of its own


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    # OpenAI sends token ids as JSON object keys, so strings; `_limits` checks them.
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}; checked
    # (and compiled) by SamplingParams, so a bad schema is a 400 naming response_format.
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _limits(self):
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop: at most 16 stop strings")
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            if not abs(value) <= MAX_BIAS:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {value!r}")
        return self

    def sampling(self, max_new_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=self.stop_token_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            response_format=canonical_response_format(self.response_format),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ModerationRequest(BaseModel):
    """OpenAI's /v1/moderations body. `input` is checked by the handler, so that any wrong
    shape gets the same one-line message."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any = None


# --- response pieces -------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(requests: list[Request], n: int = 1) -> dict[str, Any]:
    """OpenAI usage of `requests`, `n` choices per prompt in prompt-major order: the choices of
    one prompt share it, so its tokens count once (as OpenAI bills them). `cached_tokens` are
    the prompt tokens the prefix cache served, of the first choice of each prompt."""
    prompt = sum(len(r.prompt_ids) for r in requests[::n])
    completion = sum(len(r.token_ids) for r in requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in requests[::n])},
    }


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TokenText:
    """How token ids are shown in log-prob listings (the token's text and bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer else f"<{token_id}>"

    def raw(self, token_id: int) -> list[int] | None:
        return list(self.tokenizer.token_bytes(token_id)) if self.tokenizer else None

    def chat_logprobs(self, r: Request, start: int, end: int) -> dict[str, Any]:
        """OpenAI chat `logprobs` for tokens [start, end) of `r`."""
        content = []
        for i in range(start, min(end, len(r.logprobs))):
            t = r.token_ids[i]
            content.append(
                {
                    "token": self.text(t),
                    "logprob": r.logprobs[i],
                    "bytes": self.raw(t),
                    "top_logprobs": [
                        {"token": self.text(a), "logprob": lp, "bytes": self.raw(a)}
                        for a, lp in r.top_logprobs[i]
                    ],
                }
            )
        return {"content": content}

    def completion_logprobs(self, r: Request, start: int, end: int, offset: int) -> dict[str, Any]:
        """Legacy completions `logprobs` for tokens [start, end); `offset` is the text offset
        of token `start`."""
        tokens, offsets = [], []
        for i in range(start, min(end, len(r.logprobs))):
            tokens.append(self.text(r.token_ids[i]))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": r.logprobs[start:end],
            "top_logprobs": [
                {self.text(a): lp for a, lp in r.top_logprobs[i]}
                for i in range(start, min(end, len(r.logprobs)))
            ],
            "text_offset": offsets,
        }
