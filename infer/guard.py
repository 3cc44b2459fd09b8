"""Llama Guard 3 and 2 as content classifiers on this engine.

A guard model reads one prompt that lists the safety categories and the conversation, and
answers "safe" or "unsafe" with the violated category codes on a second line. The prompt must
be the one the model was trained on, so `guard_prompt` writes Meta's text character for
character: the task, category and instruction text of Meta's reference implementations
(llama-stack's `llama_guard.py`, the models' Hugging Face chat templates), wrapped for Llama
Guard 3 in the Llama 3 chat format as Meta's `llama_models.ChatFormat` encodes a user message
(the Hugging Face template of Llama-Guard-3-8B differs only in a space before
<|begin_of_text|> and no "\\n\\n" after the assistant header) and for Llama Guard 2 in its
"[INST] ... [/INST]" text. Excluded categories drop out of the list and the others keep
their codes (S1, S3, ...), as in llama-stack and the Llama Guard 3 1B template.

Meta's model cards score a conversation by the probability of "unsafe" as the first answer
token, thresholded for the decision. `LlamaGuard` generates the verdict greedily and reads
that probability from the engine's top log-probs of the first generated position: one
prefill serves the answer and the score.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infer.batching import Scheduler, scheduler_for
from infer.generate import complete
from infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from llama_jax.tokenizer import Tokenizer


class GuardVersion(enum.Enum):
    LLAMA_GUARD_3 = 3
    LLAMA_GUARD_2 = 2


CATEGORIES: dict[GuardVersion, dict[str, str]] = {
    GuardVersion.LLAMA_GUARD_3: {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex Crimes",
        "S4": "Child Exploitation",
        "S5": "Defamation",
        "S6": "Specialized Advice",
        "S7": "Privacy",
        "S8": "Intellectual Property",
        "S9": "Indiscriminate Weapons",
        "S10": "Hate",
        "S11": "Self-Harm",
        "S12": "Sexual Content",
        "S13": "Elections",
        "S14": "Code Interpreter Abuse",
    },
    GuardVersion.LLAMA_GUARD_2: {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex Crimes",
        "S4": "Child Exploitation",
        "S5": "Specialized Advice",
        "S6": "Privacy",
        "S7": "Intellectual Property",
        "S8": "Indiscriminate Weapons",
        "S9": "Hate",
        "S10": "Self-Harm",
        "S11": "Sexual Content",
    },
}


@dataclass(frozen=True)
class _Format:
    """How a version wraps the shared body, and how it ends a category line (Llama Guard 2's
    lines end in a space)."""

    head: str
    tail: str
    category_end: str


_FORMATS = {
    GuardVersion.LLAMA_GUARD_3: _Format(
        head="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        tail="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        category_end=".",
    ),
    GuardVersion.LLAMA_GUARD_2: _Format(
        head="<|begin_of_text|>[INST] ", tail=" [/INST]", category_end=". "
    ),
}

_BODY = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our"
    " safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:"
    "\n - First line must read 'safe' or 'unsafe'."
    "\n - If unsafe, a second line must include a comma-separated list of violated categories."
)

# OpenAI roles as the guard names them; system messages set up the assistant and are not
# part of what is judged.
_ROLES = {"user": "User", "assistant": "Agent"}
_SKIPPED_ROLES = {"system"}

Message = Mapping[str, Any]


def guard_prompt(
    messages: Sequence[Message],
    version: GuardVersion = GuardVersion.LLAMA_GUARD_3,
    excluded: Iterable[str] = (),
) -> str:
    """The guard's prompt (special tokens as text) judging the last of `messages` (OpenAI chat
    messages, "user" and "assistant"; "system" ones are left out): as 'User' when it is a user
    message, as 'Agent' when it is an assistant reply. `excluded` category codes are left out
    of the policy. Raises ValueError for an unknown role or code, or nothing to judge."""
    turns = [_turn(m) for m in messages if m.get("role") not in _SKIPPED_ROLES]
    if not turns:
        raise ValueError("there is no user or assistant message to judge")
    fmt = _FORMATS[version]
    lines = [f"{code}: {name}{fmt.category_end}" for code, name in policy(version, excluded)]
    body = _BODY.format(
        role=turns[-1][0],
        categories="\n".join(lines),
        conversation="\n\n".join(f"{role}: {text}" for role, text in turns),
    )
    return fmt.head + body + fmt.tail


def policy(version: GuardVersion, excluded: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(code, name) of the categories that stay after `excluded`; ValueError for an unknown
    code or when none would stay."""
    table = CATEGORIES[version]
    excluded = {code.strip().upper() for code in excluded}
    unknown = sorted(excluded - table.keys())
    if unknown:
        raise ValueError(f"unknown {version.name} categories {unknown}; known: {', '.join(table)}")
    kept = [(code, name) for code, name in table.items() if code not in excluded]
    if not kept:
        raise ValueError("every category is excluded: nothing would be checked")
    return kept


def _turn(message: Message) -> tuple[str, str]:
    role = message.get("role")
    if role not in _ROLES:
        raise ValueError(f"the guard judges user and assistant messages, not role {role!r}")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        try:
            text = "".join(p if isinstance(p, str) else p["text"] for p in content)
        except (TypeError, KeyError) as e:
            raise ValueError(f"only text content can be judged, got {content!r:.80}") from e
    return _ROLES[role], text.strip()  # the Hugging Face templates strip each message


@dataclass(frozen=True)
class Verdict:
    """A parsed answer: `safe` None when the answer is neither "safe" nor "unsafe"; `malformed`
    when it strays from the two-line format (an "unsafe" without valid codes included)."""

    safe: bool | None
    categories: tuple[str, ...]
    malformed: bool
    raw: str


_CODE = re.compile(r"S\d{1,2}")


def parse_verdict(text: str) -> Verdict:
    """Read a guard's answer, tolerating case and surrounding whitespace; never raises."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    if first == "safe":
        return Verdict(True, (), len(lines) > 1, text)
    if first != "unsafe":
        return Verdict(None, (), True, text)
    codes = [c.strip().upper() for c in lines[1].split(",")] if len(lines) > 1 else []
    valid = tuple(dict.fromkeys(c for c in codes if _CODE.fullmatch(c)))
    malformed = len(lines) != 2 or not valid or len(valid) != len(codes)
    return Verdict(False, valid, malformed, text)


@dataclass(frozen=True)
class GuardResult:
    """One conversation's judgement: `flagged` when `p_unsafe` >= the threshold (unless every
    category the model named was excluded); `categories` the violated codes it named."""

    flagged: bool
    p_unsafe: float
    verdict: Verdict

    @property
    def categories(self) -> tuple[str, ...]:
        return self.verdict.categories


class _Answer(Protocol):
    """What a result is read from: a scheduler `Request` or a `Completion`."""

    text: str
    top_logprobs: list[list[tuple[int, float]]] | None


VERDICT_TOKENS = 24  # "unsafe", a newline and the codes of several categories
DEFAULT_CONTEXT = 8192  # guard prompts are a few hundred tokens plus the conversation
# p("unsafe") comes from the 20 most likely first tokens; when it is not among them it is at
# most 1 / 21 and scores 0, so only thresholds above that decide exactly.
MIN_THRESHOLD = 1.0 / (MAX_TOP_LOGPROBS + 1)


def check_threshold(threshold: float) -> None:
    if not MIN_THRESHOLD < threshold <= 1.0:
        raise ValueError(f"threshold must be in ({MIN_THRESHOLD:.4f}, 1], got {threshold!r}")


class LlamaGuard:
    """A loaded Llama Guard model (`llama_jax.api.Model` with Meta's tokenizer) and the
    scheduler it runs on.

    `classify` drives the scheduler itself, so it is for a scheduler no thread serves; the
    server serves `scheduler` from its own thread and reads results with `result`.
    """

    def __init__(
        self,
        model: Any,
        version: GuardVersion = GuardVersion.LLAMA_GUARD_3,
        *,
        slots: int = 8,
        max_len: int | None = None,
    ) -> None:
        if not isinstance(model.tokenizer, Tokenizer):
            raise ValueError("a Llama Guard model needs Meta's Llama 3 tokenizer")
        self.model, self.version, self.tokenizer = model, version, model.tokenizer
        context = min(max_len or DEFAULT_CONTEXT, model.config.max_seq_len)
        self.scheduler: Scheduler = scheduler_for(model, slots=slots, max_len=context)
        self.params = SamplingParams(
            max_new_tokens=VERDICT_TOKENS, temperature=0.0, top_logprobs=MAX_TOP_LOGPROBS
        )
        # "unsafe" and " unsafe" are one token each: the first token of an "unsafe" answer.
        self.unsafe_ids = {self.tokenizer.encode(w)[0] for w in ("unsafe", " unsafe")}

    def prompt_ids(self, messages: Sequence[Message], excluded: Iterable[str] = ()) -> list[int]:
        """The guard prompt's token ids, its special tokens as the special ids."""
        prompt = guard_prompt(messages, self.version, excluded)
        return self.tokenizer.encode(prompt, allowed_special="all")

    def result(
        self, answer: _Answer, excluded: Iterable[str] = (), threshold: float = 0.5
    ) -> GuardResult:
        """The judgement of a finished guard request (one submitted with `params`)."""
        verdict = parse_verdict(answer.text)
        first = answer.top_logprobs[0] if answer.top_logprobs else []
        p = min(sum(math.exp(lp) for t, lp in first if t in self.unsafe_ids), 1.0)
        excluded = {c.strip().upper() for c in excluded}
        only_excluded = bool(verdict.categories) and set(verdict.categories) <= excluded
        return GuardResult(p >= threshold and not only_excluded, p, verdict)

    def classify(
        self,
        conversations: Sequence[Sequence[Message]],
        excluded: Iterable[str] = (),
        threshold: float = 0.5,
    ) -> list[GuardResult]:
        """Judge each conversation's last message, all in one batch."""
        check_threshold(threshold)
        excluded = tuple(excluded)
        ids = [self.prompt_ids(c, excluded) for c in conversations]
        done = complete(self.scheduler, ids, self.params)
        return [self.result(choices[0], excluded, threshold) for choices in done]


@dataclass(frozen=True)
class Screening:
    """What the server does with its guard: which side of a chat it screens, the decision
    threshold, the excluded categories, and the name /v1/moderations answers to."""

    guard: LlamaGuard
    model_name: str
    screen_input: bool = False
    screen_output: bool = False
    threshold: float = 0.5
    excluded: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        policy(self.guard.version, self.excluded)  # unknown codes fail at start-up

    def names(self) -> dict[str, str]:
        """Category code -> name of the categories screened for."""
        return dict(policy(self.guard.version, self.excluded))
