"""Sequence-level distillation data: a teacher's generations turned into a chat SFT set.

The input is the prompts file given to `python -m llama_jax.infer --file PROMPTS --json` and
that command's stdout: one result object per non-blank prompt line, printed in the prompts'
order and carrying no index, so results are matched to prompts by position and the counts must
agree. Each pair becomes `{"messages": [...prompt messages, {"role": "assistant", "content":
text}]}`, which `python -m llama_jax.train --sft --data OUT` trains on (the loss then falls on
the teacher's reply only). A `prompt` line was generated as a plain continuation (no chat
template) but is trained as a user turn; give instruct teachers `messages` lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, Any]
# Writes tool definitions into messages as the inference CLI did (`infer.tools.with_tools`,
# passed in by the CLI shim: `train` does not import `infer`).
AddTools = Callable[[Sequence[Message], Sequence[dict[str, Any]]], list[Message]]


class GenerationsError(ValueError):
    """A prompts or generations file that cannot be turned into SFT data."""


@dataclass(frozen=True)
class SftCounts:
    """What `to_sft` did: chats written, and results skipped because they ended by length."""

    written: int
    truncated_skipped: int


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed object) for each non-blank line, as `infer --file` reads them."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GenerationsError(f"{path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerationsError(f"{where}: not valid JSON ({e.msg})") from None


def prompt_messages(row: Any, where: str, add_tools: AddTools | None = None) -> list[Message]:
    """The conversation the teacher answered: a `prompt` as one user turn, or the `messages`
    with any `tools` written in by `add_tools`."""
    if not isinstance(row, dict):
        raise GenerationsError(f"{where}: expected an object with prompt or messages")
    if "prompt_ids" in row:
        raise GenerationsError(
            f"{where}: prompt_ids has no text for a chat; use prompt or messages"
        )
    if "prompt" in row:
        return [{"role": "user", "content": str(row["prompt"])}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GenerationsError(f"{where}: expected an object with prompt or messages")
    tools = row.get("tools")
    if not tools:
        return messages
    if add_tools is None:
        raise GenerationsError(f"{where}: tools given, but no way to write them into the chat")
    try:
        return add_tools(messages, tools)
    except ValueError as e:
        raise GenerationsError(f"{where}: {e}") from None


def reply(result: Any, where: str) -> tuple[str, bool]:
    """(generated text, whether generation ended by length) of one --json result."""
    if not isinstance(result, dict) or "finish_reason" not in result:
        raise GenerationsError(f"{where}: not an `infer --json` result (no finish_reason)")
    text = result.get("text")
    if not isinstance(text, str):
        raise GenerationsError(
            f"{where}: result has no text (was infer run without a tokenizer? pass --tokenizer)"
        )
    return text, result["finish_reason"] == "length"


def to_sft(
    prompts: str | Path,
    generations: str | Path,
    out: str | Path,
    keep_truncated: bool = False,
    add_tools: AddTools | None = None,
) -> SftCounts:
    """Write the chat SFT file `out` from a prompts file and its `infer --json` output;
    results that ended by length are dropped unless `keep_truncated` (a cut-off reply would
    teach the student to stop mid-sentence with an end-of-turn). Written atomically."""
    asked = list(read_jsonl(prompts))
    answered = list(read_jsonl(generations))
    _check_counts(asked, answered, prompts, generations)
    chats, skipped = [], 0
    for (p_where, row), (r_where, result) in zip(asked, answered, strict=True):
        messages = prompt_messages(row, p_where, add_tools)
        text, truncated = reply(result, r_where)
        if truncated and not keep_truncated:
            skipped += 1
            continue
        chats.append({"messages": [*messages, {"role": "assistant", "content": text}]})
    write_jsonl(Path(out), chats)
    return SftCounts(len(chats), skipped)


def _check_counts(asked: list, answered: list, prompts: Any, generations: Any) -> None:
    """Results carry no index, so a count mismatch means the files do not belong together;
    the error names the first line left without a partner."""
    if len(asked) == len(answered):
        return
    if len(asked) > len(answered):
        where, what = asked[len(answered)][0], "prompt without a result"
    else:
        where, what = answered[len(asked)][0], "result without a prompt"
    raise GenerationsError(
        f"{where}: {what}: {len(asked)} prompts in {prompts}, {len(answered)} results in "
        f"{generations} (matched by order)"
    )


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """`rows` as JSONL, written atomically (`write_atomic`)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place, so an interrupted run never leaves
    a half-written file that a later step would read as complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)
