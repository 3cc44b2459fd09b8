"""Putting OpenAI-style tool definitions into a Llama 3.1 prompt.

`llama_jax.chat` renders messages token-exactly but does not describe the tools on offer; this
does, the way Llama 3.1's own chat template does for JSON tool calling: the system turn gets
"Environment: ipython", and the first user turn is prefixed with the function definitions and
the instruction to answer with `{"name": ..., "parameters": ...}`. Replies are then read back
by `llama_jax.chat.parse_assistant`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TOOL_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)

# A streamed reply that starts like this may still become a tool call, so it is held back.
TOOL_CALL_STARTS = ("{", "[", "<")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools`: a list of {"type": "function", "function": {"name": ..., ...}}."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
    return tools


def with_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict]:
    """`messages` with the tool definitions written in (unchanged when `tools` is empty)."""
    messages = [dict(m) for m in messages]
    if not tools:
        return messages
    if messages and messages[0].get("role") == "system":
        body = _text(messages.pop(0).get("content"))
    else:
        body = ""
    messages.insert(0, {"role": "system", "content": "Environment: ipython\n\n" + body})
    definitions = "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
    for m in messages:
        if m.get("role") == "user":
            m["content"] = TOOL_INSTRUCTION + definitions + _text(m.get("content"))
            break
    else:
        raise ValueError("tools need a user message to attach their definitions to")
    return messages


def _text(content: Any) -> str:
    """OpenAI message content (None, a string or text parts) as one string."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)


def may_be_tool_call(text: str) -> bool:
    """Whether a reply beginning with `text` could still turn out to be a tool call."""
    head = text.lstrip()
    return not head or head.startswith(TOOL_CALL_STARTS)
