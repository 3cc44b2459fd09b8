"""Llama 3.1 chat format with tool calls, token-exact with Meta's `llama_models` ChatFormat.

Messages are OpenAI-style dicts. Each becomes
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{body}<|eot_id|>` (tool results use the `ipython`
role; an assistant turn that stopped to wait for a tool result ends in `<|eom_id|>`), behind one
`<|begin_of_text|>`. Assistant tool calls are rendered the way Meta's reference renders them (JSON
tool-call format): `brave_search.call(query="...")` for the search/math/photo built-ins, raw code
after `<|python_tag|>` for the code interpreter, and a JSON object for custom functions.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from llama_jax.tokenizer import Tokenizer

Message = dict[str, Any]

# Built-in tools whose calls take one `query` string (rendered as `name.call(query="...")`).
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS = (*QUERY_TOOLS, CODE_INTERPRETER)

_HEADER_ROLE = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}

# How generated text spells the calls (same grammar as Meta's decoder).
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^}]+)>(?=\{)")
_BRACED_LINE = re.compile(r"\{.*?\}")


def encode_dialog(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """Prompt ids for `messages`, ending with an open assistant header unless told not to."""
    return _encode(tokenizer, messages, add_generation_prompt)[0]


def encode_dialog_with_mask(
    tokenizer: Tokenizer, messages: Sequence[Message]
) -> tuple[list[int], list[int]]:
    """Ids of a complete dialog plus a 0/1 loss mask for supervised fine-tuning.

    The mask is 1 exactly on what the model must learn to produce: the body of each assistant
    message (python tag, content, tool calls) and its closing eot/eom. Headers are prompt.
    """
    return _encode(tokenizer, messages, add_generation_prompt=False)


def require_chat_format(tokenizer: Any) -> None:
    """Raise ValueError unless `tokenizer` can spell this format: it needs Llama 3's header and
    end-of-turn tokens, which SentencePiece (Llama 1/2) vocabularies do not have."""
    if getattr(tokenizer, "start_header_id", None) is None:
        where = getattr(tokenizer, "path", type(tokenizer).__name__)
        raise ValueError(
            f"{where}: chat needs a Llama 3 tokenizer (<|start_header_id|>, <|eot_id|>); "
            "this one has no chat format, so give a plain text prompt"
        )


def _encode(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    require_chat_format(tokenizer)
    ids = [tokenizer.bos_id]
    mask = [0]
    for message in messages:
        header, body = _encode_message(tokenizer, message)
        learn = 1 if message.get("role") == "assistant" else 0
        ids += header + body
        mask += [0] * len(header) + [learn] * len(body)
    if add_generation_prompt:
        header = _encode_header(tokenizer, "assistant")
        ids += header
        mask += [0] * len(header)
    return ids, mask


def _encode_header(tokenizer: Tokenizer, role: str) -> list[int]:
    return [
        tokenizer.start_header_id,
        *tokenizer.encode(role),
        tokenizer.end_header_id,
        *tokenizer.encode("\n\n"),
    ]


def _encode_message(tokenizer: Tokenizer, message: Message) -> tuple[list[int], list[int]]:
    """(header ids, body ids); the body includes the closing eot/eom token."""
    role = message.get("role")
    if role not in _HEADER_ROLE:
        raise ValueError(f"message role must be one of {sorted(_HEADER_ROLE)}, got {role!r}")
    calls = (
        [_unpack_call(call) for call in message.get("tool_calls") or ()]
        if role == "assistant"
        else []
    )
    body: list[int] = []
    # Meta's reference tags a turn as code only when its first call is the code interpreter.
    if calls and calls[0][0] == CODE_INTERPRETER:
        body.append(tokenizer.python_tag_id)
    # Each content part and each call is tokenized separately, as the reference does.
    for text in _text_parts(message.get("content")):
        body += tokenizer.encode(text)
    for name, args in calls:
        body += tokenizer.encode(_render_call(name, args))
    eom = role == "assistant" and message.get("stop_reason") == "end_of_message"
    body.append(tokenizer.eom_id if eom else tokenizer.eot_id)
    return _encode_header(tokenizer, _HEADER_ROLE[role]), body


def _text_parts(content: Any) -> list[str]:
    """OpenAI content: a string, None, or a list of strings / `{"type": "text", "text": ...}`."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"only text content parts are supported, got {part!r}")
    return parts


def _unpack_call(call: Message) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI tool call; arguments may be a JSON string or a dict."""
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments") or {}
    if not isinstance(name, str):
        raise ValueError(f"tool call needs a function name, got {call!r}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object, got {args!r}")
    return name, args


def _render_call(name: str, args: dict[str, Any]) -> str:
    """The text the model writes for a call, in the reference's JSON tool-call format."""
    required = "query" if name in QUERY_TOOLS else "code" if name == CODE_INTERPRETER else None
    if required is not None and required not in args:
        raise ValueError(f"tool call {name!r} needs a {required!r} argument, got {sorted(args)}")
    if name in QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == CODE_INTERPRETER:
        return args["code"]
    return json.dumps({"type": "function", "name": name, "parameters": args})


def parse_assistant(tokenizer: Tokenizer, ids: Sequence[int]) -> Message:
    """Generated assistant ids -> OpenAI-style message, following Meta's decoder.

    Returns {"role": "assistant", "content", "tool_calls", "stop_reason"}; stop_reason is
    "end_of_turn" / "end_of_message" when the ids end in eot / eom, else "out_of_tokens". When a
    tool call is recognised the content is "" (as in the reference). Calls are tried in the
    reference's order: `<function=name>{...}`, a whole-body JSON object with a "name", a Python
    list of calls, `name.call(query="...")`, then plain code after `<|python_tag|>`.
    """
    text = tokenizer.decode(ids).strip(" ")
    header = tokenizer.decode(_encode_header(tokenizer, "assistant"))
    text = text.removeprefix(header)
    python_tag = tokenizer.decode([tokenizer.python_tag_id])
    is_code = text.startswith(python_tag)
    text = text.removeprefix(python_tag)
    stop_reason = "out_of_tokens"
    for token_id, reason in (
        (tokenizer.eot_id, "end_of_turn"),
        (tokenizer.eom_id, "end_of_message"),
    ):
        end = tokenizer.decode([token_id])
        if text.endswith(end):
            text, stop_reason = text[: -len(end)], reason
            break
    calls = _parse_calls(text, is_code)
    return {
        "role": "assistant",
        "content": "" if calls else text,
        "tool_calls": [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            for name, args in calls
        ],
        "stop_reason": stop_reason,
    }


def _parse_calls(text: str, is_code: bool) -> list[tuple[str, Any]]:
    custom = _function_tag_call(text) or _json_call(text) or _python_list_calls(text)
    if custom:
        return [_as_builtin(name, args) for name, args in custom]
    builtin = _BUILTIN_CALL.search(text)
    if builtin:
        return [(builtin["name"], {"query": builtin["query"]})]
    if is_code:
        return [(CODE_INTERPRETER, {"code": text})]
    return []


def _as_builtin(name: str, args: Any) -> tuple[str, Any]:
    """A built-in tool called in custom syntax keeps only its first argument (as the reference).

    The reference names that argument "query" for every built-in; for the code interpreter we
    name it "code" so the call stays executable.
    """
    if name not in BUILTIN_TOOLS or not isinstance(args, dict) or not args:
        return name, args
    return name, {"code" if name == CODE_INTERPRETER else "query": next(iter(args.values()))}


def _function_tag_call(text: str) -> list[tuple[str, Any]]:
    """`<function=name>{json}`; nested objects and apostrophes in strings are accepted, and
    single-quoted flat objects are read by swapping quotes as the reference does."""
    tag = _FUNCTION_TAG.search(text)
    if tag is None:
        return []
    try:
        args, _ = json.JSONDecoder().raw_decode(text, tag.end())
    except json.JSONDecodeError:
        braced = _BRACED_LINE.match(text, tag.end())
        try:
            args = json.loads(braced[0].replace("'", '"')) if braced else None
        except json.JSONDecodeError:
            args = None
    return [(tag["name"], args)] if isinstance(args, dict) else []


def _json_call(text: str) -> list[tuple[str, Any]]:
    """A body that is one JSON object naming a function: {"name", "parameters"} (or "arguments")."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return []
    return [(obj["name"], obj.get("parameters", obj.get("arguments", {})))]


def _python_list_calls(text: str) -> list[tuple[str, Any]]:
    """`[f(a=1), g(b="x")]`: keyword-only calls with literal values (Llama 3.2's format).

    Unlike the reference, which keeps only the first, every call in the list is returned.
    """
    try:
        module = ast.parse(text)
        if len(module.body) != 1 or not isinstance(module.body[0], ast.Expr):
            return []
        listed = module.body[0].value
        if not isinstance(listed, ast.List) or not listed.elts:
            return []
        calls = []
        for node in listed.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
                return []
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            if None in args:  # `**kwargs`
                return []
            calls.append((node.func.id, args))
        return calls
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return []
