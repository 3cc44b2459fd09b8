"""Chat format and tool calls, compared token for token with Meta's llama_models ChatFormat."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama3_assets import ASSETS, meta_tokenizer_path

from llama_jax.chat import encode_dialog, encode_dialog_with_mask, parse_assistant
from llama_jax.tokenizer import Tokenizer

MODEL = meta_tokenizer_path()
pytestmark = pytest.mark.skipif(
    MODEL is None, reason="Meta's tokenizer.model not in ../shared/assets/llama3 nor llama_models"
)


def call(name: str, **arguments: Any) -> dict[str, Any]:
    """An OpenAI-style tool call."""
    return {
        "id": f"call_{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


SYSTEM_TOOLS = (
    "Environment: ipython\nTools: brave_search, wolfram_alpha\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\n"
    "You are a helpful assistant.\n"
)
PI_RESULT = '{"queryresult": {"success": true, "pods": [{"title": "Result", "plaintext": "7"}]}}'

DIALOGS: dict[str, list[dict[str, Any]]] = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Eiffel tower rises\nSeine flows under old bridges"},
        {"role": "user", "content": "Og på norsk? 🇳🇴 And in 中文?"},
        {"role": "assistant", "content": "  Spaces kept  \n\n"},
        {"role": "user", "content": "Say <|eot_id|> literally"},
    ],
    "content_parts": [
        {"role": "user", "content": [{"type": "text", "text": "part one."}, "part two"]},
        {"role": "assistant", "content": None},
    ],
    "brave_search": [
        {"role": "system", "content": SYSTEM_TOOLS},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("brave_search", query="latest price of 1oz gold")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "tool_call_id": "call_brave_search", "content": '{"price": "$2,650"}'},
    ],
    "wolfram_full_interaction": [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("wolfram_alpha", query="100th decimal of pi")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "content": PI_RESULT},
        {"role": "assistant", "content": "The 100th decimal of pi is 7."},
        {"role": "user", "content": "Thanks"},
    ],
    "code_interpreter": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Is 7 prime? Use code."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call(
                    "code_interpreter",
                    code="def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))"
                    "\n\nprint(is_prime(7))",
                )
            ],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "True"},
    ],
    "code_then_search_eot": [
        {"role": "user", "content": "Do two things"},
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                call("code_interpreter", code="print(1 + 1)"),
                call("brave_search", query="two things"),
            ],
        },
    ],
    "custom_json_tool": [
        {"role": "system", "content": "Environment: ipython\n\nYou are a helpful assistant.\n"},
        {"role": "user", "content": "Use tools to get latest trending songs"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("trending_songs", n="10", genre="all")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "content": '["Espresso", "Birds of a Feather"]'},
        {"role": "assistant", "content": "The trending songs are Espresso and Birds of a Feather."},
    ],
    "custom_tool_unicode_args_dict": [
        {"role": "user", "content": "Vær i Tromsø?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "x",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Tromsø", "days": 3, "metric": True, "x": None},
                    },
                },
                call("get_time", tz="Europe/Oslo"),
            ],
        },
        {"role": "tool", "content": "-3°C, snø ❄️"},
    ],
}


def to_raw(message: dict[str, Any]):
    """The reference's RawMessage for an OpenAI-style message dict."""
    from llama_models.datatypes import RawMessage, RawTextItem, StopReason, ToolCall

    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = [RawTextItem(text=p if isinstance(p, str) else p["text"]) for p in content]
    calls = []
    for c in message.get("tool_calls") or []:
        args = c["function"]["arguments"]
        calls.append(
            ToolCall(
                call_id=c["id"],
                tool_name=c["function"]["name"],
                arguments=json.loads(args) if isinstance(args, str) else args,
            )
        )
    role = "tool" if message["role"] == "ipython" else message["role"]
    stop = message.get("stop_reason")
    return RawMessage(
        role=role,
        content=content,
        tool_calls=calls,
        stop_reason=StopReason(stop) if stop else None,
    )


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def ref_format():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    return ChatFormat(RefTokenizer(MODEL))


def test_meta_dialog_vector(tok: Tokenizer) -> None:
    vectors_file = ASSETS / "test_vectors.json"
    if not vectors_file.is_file():
        pytest.skip(f"{vectors_file} not found")
    meta = json.loads(vectors_file.read_text())["meta_tests"]
    dialog = DIALOGS["system_user"]
    key = "encode_dialog_prompt([system: 'This is a test sentence.', user: 'This is a response.'])"
    assert encode_dialog(tok, dialog) == meta[key]
    user_message = meta["encode_message(user: 'This is a test sentence.')"]
    user_only = [{"role": "user", "content": "This is a test sentence."}]
    assert encode_dialog(tok, user_only, add_generation_prompt=False) == [128000, *user_message]


@pytest.mark.slow
@pytest.mark.parametrize("name", DIALOGS)
def test_encode_dialog_matches_llama_models(tok: Tokenizer, ref_format, name: str) -> None:
    dialog = DIALOGS[name]
    expected = ref_format.encode_dialog_prompt([to_raw(m) for m in dialog]).tokens
    assert encode_dialog(tok, dialog) == expected
    assert encode_dialog(tok, dialog, add_generation_prompt=False) == expected[:-4]


def test_rendered_tool_calls(tok: Tokenizer) -> None:
    text = tok.decode(encode_dialog(tok, DIALOGS["code_then_search_eot"]))
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>Sure.print(1 + 1)"
        'brave_search.call(query="two things")<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    text = tok.decode(encode_dialog(tok, DIALOGS["custom_json_tool"]))
    assert (
        '\n\n{"type": "function", "name": "trending_songs", "parameters": {"n": "10", '
        '"genre": "all"}}<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n["Espresso"'
    ) in text


def test_assistant_mask(tok: Tokenizer) -> None:
    dialog = DIALOGS["wolfram_full_interaction"]
    ids, mask = encode_dialog_with_mask(tok, dialog)
    assert ids == encode_dialog(tok, dialog, add_generation_prompt=False)
    assert len(mask) == len(ids)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    call_ids = tok.encode('wolfram_alpha.call(query="100th decimal of pi")')
    answer_ids = tok.encode("The 100th decimal of pi is 7.")
    assert learned == [*call_ids, tok.eom_id, *answer_ids, tok.eot_id]
    # The masked spans are contiguous and each ends on the turn's closing token.
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [ids[i] for i in ends] == [tok.eom_id, tok.eot_id]
    assert mask[0] == 0


def test_mask_covers_python_tag_and_content(tok: Tokenizer) -> None:
    ids, mask = encode_dialog_with_mask(tok, DIALOGS["code_then_search_eot"])
    first = mask.index(1)
    assert ids[first - 4 : first] == [tok.start_header_id, 78191, tok.end_header_id, 271]
    assert ids[first] == tok.python_tag_id
    assert sum(mask) == len(ids) - first


GENERATIONS = [
    "Paris is the capital of France.<|eot_id|>",
    "  Hello there  <|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nHeader echoed.<|eot_id|>",
    'brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>',
    'I will search: my_tool.call(query="x y")<|eot_id|>',
    "<|python_tag|>def f(n):\n    return n * 2\n\nprint(f(21))<|eom_id|>",
    '<|python_tag|>{"type": "function", "name": "trending_songs", '
    '"parameters": {"n": "10", "genre": "all"}}<|eom_id|>',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
    '{"name": "brave_search", "parameters": {"q": "news"}}<|eom_id|>',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    "<function=get_weather>{'city': 'Bergen'}</function><|eot_id|>",
    '[get_boiling_point(liquid_name="water", celcius=True)]<|eot_id|>',
    '{"just": "json, not a call"}<|eot_id|>',
    "Unfinished answer without a stop token",
    "Stop text mid-way <|eot_id|> then more",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", GENERATIONS)
def test_parse_assistant_matches_llama_models(tok: Tokenizer, ref_format, text: str) -> None:
    from llama_models.datatypes import StopReason

    ids = tok.encode(text, allowed_special="all")
    ours = parse_assistant(tok, ids)
    ref = ref_format.decode_assistant_message(ids, StopReason.out_of_tokens)
    assert ours["role"] == "assistant"
    assert ours["content"] == ref.content
    assert ours["stop_reason"] == ref.stop_reason.value
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ours["tool_calls"]
    ]
    want = [(getattr(t.tool_name, "value", t.tool_name), t.arguments) for t in ref.tool_calls]
    assert got == want
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in ours["tool_calls"])


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        # Nested objects and apostrophes inside strings (the reference gives up on these).
        (
            '<function=book>{"who": {"name": "O\'Brien"}, "seats": [1, 2]}</function>',
            [("book", {"who": {"name": "O'Brien"}, "seats": [1, 2]})],
        ),
        # Every call of a Python-list reply (the reference keeps only the first).
        (
            '[get_weather(city="Oslo"), get_time(tz="CET", verbose=False)]',
            [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET", "verbose": False})],
        ),
        # The code interpreter called in custom syntax keeps a "code" argument.
        (
            '<function=code_interpreter>{"source": "print(2)"}</function>',
            [("code_interpreter", {"code": "print(2)"})],
        ),
        ('{"name": "lookup", "arguments": {"id": 7}}', [("lookup", {"id": 7})]),
        ("[not_a_call, 3]", []),
    ],
)
def test_parse_assistant_beyond_reference(tok: Tokenizer, text: str, calls: list) -> None:
    message = parse_assistant(tok, [*tok.encode(text), tok.eot_id])
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ]
    assert got == calls
    assert message["content"] == ("" if calls else text)
    assert message["stop_reason"] == "end_of_turn"


@pytest.mark.parametrize("name", DIALOGS)
def test_assistant_turns_round_trip(tok: Tokenizer, name: str) -> None:
    """Encoding an assistant turn, parsing its body back and re-encoding gives the same ids.

    Skipped: several calls in one turn and content with outer spaces (the parser strips them).
    """
    for message in DIALOGS[name]:
        content = message.get("content") or ""
        if message["role"] != "assistant" or len(message.get("tool_calls") or []) > 1:
            continue
        if isinstance(content, str) and content != content.strip(" "):
            continue
        ids, mask = encode_dialog_with_mask(tok, [message])
        body = [i for i, m in zip(ids, mask, strict=True) if m]
        parsed = parse_assistant(tok, body)
        assert parsed["stop_reason"] == message.get("stop_reason", "end_of_turn")
        assert encode_dialog_with_mask(tok, [parsed])[0] == ids


def test_invalid_messages_raise(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="message role must be one of"):
        encode_dialog(tok, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="'brave_search' needs a 'query' argument"):
        encode_dialog(tok, [{"role": "assistant", "tool_calls": [call("brave_search", q="x")]}])
    with pytest.raises(ValueError, match="tool call needs a function name"):
        encode_dialog(tok, [{"role": "assistant", "tool_calls": [{"function": {}}]}])
    with pytest.raises(ValueError, match="'f': arguments must be a JSON object"):
        bad_json = {"function": {"name": "f", "arguments": "{oops"}}
        encode_dialog(tok, [{"role": "assistant", "tool_calls": [bad_json]}])
    with pytest.raises(ValueError, match="only text content parts"):
        encode_dialog(tok, [{"role": "user", "content": [{"type": "image", "data": b""}]}])
    with pytest.raises(ValueError, match="arguments must be a JSON object"):
        encode_dialog(
            tok,
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
        )
