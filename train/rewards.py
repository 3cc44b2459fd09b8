"""Rewards for sampled completions: `reward(samples) -> float32 [len(samples)]`, batched.

A reward is any callable over a list of `Sample`s (prompt, completion, reference answer, and
their ids). `--reward SPEC` picks one:

  exact              1 when the completion, stripped, equals the row's `answer`, else 0
  regex:PATTERN      1 when PATTERN's first match in the completion (its group 1 if it has
                     one) equals the `answer`, e.g. `regex:answer is (-?\\d+)`
  arithmetic         1 when the completion starts with the right result of the prompt's sum
                     (`7+8=` -> `15`, and no further digit): needs no `answer`
  model:CHECKPOINT   a reward model's scalar score of prompt + completion (`train.reward_model`)
  python:MOD:FN      FN(samples) -> floats, from importable module MOD
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from train.prompts import PromptRow


class RewardError(ValueError):
    """A reward spec that names no reward, or samples a reward cannot score."""


@dataclass(frozen=True)
class Sample:
    """One completion of one prompt, as a reward sees it. `completion` is the generated text
    without its stop token; `answer` the prompt row's reference (None when it has none)."""

    prompt: str
    completion: str
    answer: str | None
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


Reward = Callable[[Sequence[Sample]], np.ndarray]


class Completion(Protocol):
    """What the sampler returns per completion (`infer.generate.Completion` is one): the
    generated ids (ending with the stop token when one ended it), their log-probs under the
    sampled distribution before temperature, the text without the stop token."""

    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str


def samples(rows: Sequence[PromptRow], groups: Sequence[Sequence[Completion]]) -> list[Sample]:
    """The rewards' view of sampled completions (`groups[i]` answering `rows[i]`): each with
    its prompt's text and answer, its ids without the stop token that ended it."""
    out = []
    for row, group in zip(rows, groups, strict=True):
        for c in group:
            ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
            out.append(Sample(row.text, c.text, row.answer, row.ids, tuple(ids)))
    return out


def _needs_answer(samples: Sequence[Sample], name: str) -> None:
    for s in samples:
        if s.answer is None:
            raise RewardError(
                f"reward {name}: the prompt {s.prompt!r:.40} has no 'answer' to compare with"
            )


def exact(samples: Sequence[Sample]) -> np.ndarray:
    _needs_answer(samples, "exact")
    return np.float32([s.completion.strip() == s.answer.strip() for s in samples])


def regex(pattern: str) -> Reward:
    """The `regex:PATTERN` reward (see the module docstring)."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise RewardError(f"--reward regex:{pattern}: not a regular expression ({e})") from None

    def reward(samples: Sequence[Sample]) -> np.ndarray:
        _needs_answer(samples, "regex")
        out = []
        for s in samples:
            m = compiled.search(s.completion)
            found = None if m is None else m.group(1 if compiled.groups else 0)
            out.append(found is not None and found.strip() == s.answer.strip())
        return np.float32(out)

    return reward


_SUM = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*$")


def arithmetic(samples: Sequence[Sample]) -> np.ndarray:
    """The verifiable reward of the built-in corpus: any `a+b=` / `a-b=` prompt (the sum is
    computed, so it is not limited to the corpus's facts)."""
    out = []
    for s in samples:
        m = _SUM.search(s.prompt)
        if m is None:
            raise RewardError(f"reward arithmetic: the prompt {s.prompt!r:.40} is not a sum")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        answer = str(a + b if op == "+" else a - b)
        text = s.completion.strip()
        out.append(text.startswith(answer) and not text[len(answer) : len(answer) + 1].isdigit())
    return np.float32(out)


def _python(spec: str) -> Reward:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"--reward python:{spec}: {e}") from None

    def reward(samples: Sequence[Sample]) -> np.ndarray:
        scores = np.asarray(fn(list(samples)), np.float32)
        if scores.shape != (len(samples),):
            raise RewardError(
                f"reward python:{spec} returned shape {scores.shape} for {len(samples)} samples"
            )
        return scores

    return reward


BUILTIN = {"exact": exact, "arithmetic": arithmetic}


def parse_reward(spec: str, **model_options: Any) -> Reward:
    """The reward named by `spec` (see the module docstring); `model_options` go to the reward
    model's loader (`mesh`, `rules`, `batch`)."""
    kind, sep, rest = spec.partition(":")
    if not sep and kind in BUILTIN:
        return BUILTIN[kind]
    if kind == "regex" and sep:
        return regex(rest)
    if kind == "python" and sep:
        return _python(rest)
    if kind == "model" and rest:
        from train.reward_model import reward_from_checkpoint

        return reward_from_checkpoint(rest, **model_options)
    known = ", ".join([*BUILTIN, "regex:PATTERN", "model:CHECKPOINT", "python:MODULE:FN"])
    raise RewardError(f"--reward {spec!r}: expected one of {known}")
