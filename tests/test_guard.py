"""Llama Guard: the prompt against Meta's references, verdict parsing, and the guard in the
server (chat screening and /v1/moderations through the `openai` client).

The reference prompts are the Hugging Face chat templates of meta-llama/Llama-Guard-3-8B and
meta-llama/Meta-Llama-Guard-2-8B (`chat_template` of their tokenizer_config.json), written out
below as data and rendered with jinja2 as transformers renders them. Llama Guard 3's prompt
is Meta's text in the Llama 3 chat format, so its token ids are checked against Meta's
`llama_models` ChatFormat encoding the prompt body as a user message (the Hugging Face
template differs from that only at the edges: a space before <|begin_of_text|> and no
"\\n\\n" after the assistant header). Excluded categories follow llama-stack's
`llama_guard.py`: the line goes, the other codes stay.

The guards in the server tests are tiny bigram models (every layer's output zeroed, so a
token's logits depend on that token alone) scripted to answer "safe" or "unsafe\\nS1" after
the prompt's last token, so both verdicts occur deterministically.
"""

from __future__ import annotations

import json

import httpx
import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama3_assets import meta_tokenizer_path
from openai import OpenAI
from test_server_ops import scrape

import llama_jax
from infer.batching import scheduler_for
from infer.guard import (
    CATEGORIES,
    GuardVersion,
    LlamaGuard,
    Screening,
    guard_prompt,
    parse_verdict,
)
from infer.server import create_app
from llama_jax import guard as guard_cli
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer

MODEL = meta_tokenizer_path()
pytestmark = pytest.mark.skipif(MODEL is None, reason="Meta's tokenizer.model not found")

_LOOP = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{% set role = 'User' %}{% elif message['role'] == 'assistant' %}{% set role = 'Agent' %}"
    "{% endif %}{{ role + ': ' + content.strip() + '\n\n' }}{% endfor %}"
)
HF_TEMPLATE_3 = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}"
    '{% endif %}{{ " <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check'
    " if there is unsafe content in '\" + role + \"' messages in conversations according our"
    " safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    "S1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\n"
    "S5: Defamation.\nS6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\n"
    "S9: Indiscriminate Weapons.\nS10: Hate.\nS11: Self-Harm.\nS12: Sexual Content.\n"
    "S13: Elections.\nS14: Code Interpreter Abuse.\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    '<BEGIN CONVERSATION>\n\n" }}' + _LOOP + '{{ "<END CONVERSATION>\n\nProvide your safety'
    ' assessment for ONLY THE LAST " + role + " message in the above conversation:\n - First'
    " line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a"
    " comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant"
    '<|end_header_id|>" }}'
)
HF_TEMPLATE_2 = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}"
    '{% endif %}{{ "[INST] Task: Check if there is unsafe content in \'" + role + "\' messages'
    " in conversations according our safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes. \nS2: Non-Violent Crimes. \n"
    "S3: Sex Crimes. \nS4: Child Exploitation. \nS5: Specialized Advice. \nS6: Privacy. \n"
    "S7: Intellectual Property. \nS8: Indiscriminate Weapons. \nS9: Hate. \nS10: Self-Harm. \n"
    'S11: Sexual Content. \n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n" }}'
    + _LOOP
    + '{{ "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST " + role +'
    " \" message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    ' [/INST]" }}'
)

USER_ONLY = [{"role": "user", "content": "How do I bake sourdough bread?"}]
USER_AGENT = [*USER_ONLY, {"role": "assistant", "content": " Mix flour, water and starter. "}]
MULTI_TURN = [
    *USER_AGENT,
    {"role": "user", "content": "And how long should it rise?"},
    {"role": "assistant", "content": "About four hours at room temperature."},
    {"role": "user", "content": "Thanks!"},
]
CONVERSATIONS = [USER_ONLY, USER_AGENT, MULTI_TURN]


def hf_render(template: str, messages: list[dict]) -> str:
    """A chat template rendered as transformers does (`apply_chat_template`)."""

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(MODEL)


def test_guard3_user_only_prompt_in_full():
    assert guard_prompt(USER_ONLY) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Task: Check if there is unsafe content in 'User' messages in conversations according"
        " our safety policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        "S1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\n"
        "S5: Defamation.\nS6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\n"
        "S9: Indiscriminate Weapons.\nS10: Hate.\nS11: Self-Harm.\nS12: Sexual Content.\n"
        "S13: Elections.\nS14: Code Interpreter Abuse.\n"
        "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\nUser: How do I bake sourdough bread?\n\n<END CONVERSATION>\n\n"
        "Provide your safety assessment for ONLY THE LAST User message in the above"
        " conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second"
        " line must include a comma-separated list of violated categories."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "user+agent", "multi-turn"])
def test_guard3_prompt_and_ids_match_meta(messages, tok, meta_tok):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    ours = guard_prompt(messages, GuardVersion.LLAMA_GUARD_3)
    hf = hf_render(HF_TEMPLATE_3, messages)
    assert hf.startswith(" <|begin_of_text|>") and ours == hf[1:] + "\n\n"
    role = "Agent" if messages[-1]["role"] == "assistant" else "User"
    assert f"ONLY THE LAST {role} message" in ours
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    body = ours.removeprefix(head).removesuffix(tail)
    dialog = [RawMessage(role="user", content=body)]
    expected = ChatFormat(meta_tok).encode_dialog_prompt(dialog).tokens
    assert tok.encode(ours, allowed_special="all") == expected


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "user+agent", "multi-turn"])
def test_guard2_prompt_and_ids_match_meta(messages, tok, meta_tok):
    ours = guard_prompt(messages, GuardVersion.LLAMA_GUARD_2)
    hf = hf_render(HF_TEMPLATE_2, messages)
    assert ours == "<|begin_of_text|>" + hf  # the tokenizer adds BOS
    assert tok.encode(ours, allowed_special="all") == meta_tok.encode(hf, bos=True, eos=False)


@pytest.mark.parametrize("version", list(GuardVersion))
def test_excluded_categories_drop_out_and_the_rest_keep_their_codes(version):
    full = guard_prompt(USER_AGENT, version)
    cut = guard_prompt(USER_AGENT, version, excluded=["s2", "S5"])
    names = CATEGORIES[version]
    end = "." if version is GuardVersion.LLAMA_GUARD_3 else ". "
    expected = full
    for code in ("S2", "S5"):
        expected = expected.replace(f"{code}: {names[code]}{end}\n", "")
    assert cut == expected and "S3: Sex Crimes" in cut and "S1: Violent Crimes" in cut
    with pytest.raises(ValueError, match="unknown"):
        guard_prompt(USER_ONLY, version, excluded=["S99"])
    with pytest.raises(ValueError, match="every category"):
        guard_prompt(USER_ONLY, version, excluded=list(names))


def test_system_messages_are_left_out_and_odd_roles_refused():
    with_system = [{"role": "system", "content": "Be brief."}, *USER_AGENT]
    assert guard_prompt(with_system) == guard_prompt(USER_AGENT)
    parts = [{"role": "user", "content": [{"type": "text", "text": "How do I bake "},
                                          {"type": "text", "text": "sourdough bread?"}]}]  # fmt: skip
    assert guard_prompt(parts) == guard_prompt(USER_ONLY)
    with pytest.raises(ValueError, match="role 'tool'"):
        guard_prompt([*USER_ONLY, {"role": "tool", "content": "42"}])
    with pytest.raises(ValueError, match="no user or assistant"):
        guard_prompt([{"role": "system", "content": "x"}])


def test_verdict_tokens_are_metas(tok):
    # Meta's Llama Guard 3 1B instructions: "19193 is safe, 39257 is unsafe".
    assert tok.encode("safe") == [19193] and tok.encode("unsafe") == [39257]


@pytest.mark.parametrize(
    "text, safe, categories, malformed",
    [
        ("safe", True, (), False),
        ("  Safe \n", True, (), False),
        ("unsafe\nS1", False, ("S1",), False),
        ("unsafe\nS1,S10,S14", False, ("S1", "S10", "S14"), False),
        ("UNSAFE\n s2 , s11 \n", False, ("S2", "S11"), False),
        ("unsafe", False, (), True),
        ("unsafe\nviolence", False, (), True),
        ("unsafe\nS1,banana", False, ("S1",), True),
        ("safe\nS1", True, (), True),
        ("", None, (), True),
        ("   \n\n", None, (), True),
        ("I cannot answer that", None, (), True),
        ("unsafeunsafe", None, (), True),
    ],
)
def test_parse_verdict_never_raises(text, safe, categories, malformed):
    v = parse_verdict(text)
    assert (v.safe, v.categories, v.malformed, v.raw) == (safe, categories, malformed, text)


# --- the guard on the engine and in the server ------------------------------------------------

CONFIG = llama_jax.LlamaConfig(
    dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128256, max_seq_len=512
)


def scripted_guard(tok: Tokenizer, answer: str) -> llama_jax.Model:
    """A bigram model answering `answer` (then <|eot_id|>) after the prompt's last token."""
    params = jax.tree.map(np.array, init_params(CONFIG, 0))
    params["layers"]["attention"]["wo"][:] = 0
    params["layers"]["feed_forward"]["w2"][:] = 0
    chain = [tok.encode("\n\n")[0], *tok.encode(answer)]
    following = [*chain[1:], tok.eot_id]
    emb, out = params["tok_embeddings"], params["output"]
    out[: len(chain)] = 0
    for j, (token, nxt) in enumerate(zip(chain, following, strict=True)):
        emb[token] = 0
        emb[token, j] = 1.0
        out[j, nxt] = 5.0
    return llama_jax.Model(CONFIG, jax.tree.map(jax.numpy.asarray, params), tokenizer=tok)


@pytest.fixture(scope="module")
def guards(tok) -> dict[str, LlamaGuard]:
    return {a: LlamaGuard(scripted_guard(tok, a), slots=4) for a in ("safe", "unsafe\nS1")}


def test_classify_answers_and_scores(guards, tok):
    ids = guards["safe"].prompt_ids(USER_AGENT, excluded=["S3"])
    assert ids == tok.encode(guard_prompt(USER_AGENT, excluded=["S3"]), allowed_special="all")
    [safe] = guards["safe"].classify([USER_ONLY])
    unsafe, agent = guards["unsafe\nS1"].classify([USER_ONLY, USER_AGENT])
    assert safe.verdict.safe and not safe.flagged and safe.p_unsafe < 1e-3
    assert unsafe.flagged and unsafe.categories == ("S1",) and unsafe.p_unsafe > 0.99
    assert agent.flagged and not agent.verdict.malformed
    [excused] = guards["unsafe\nS1"].classify([USER_ONLY], excluded=["S1"])
    assert not excused.flagged  # the only category it named is not checked
    with pytest.raises(ValueError, match="threshold"):
        guards["safe"].classify([USER_ONLY], threshold=0.01)


def test_guard_command_prints_a_verdict_per_conversation(tok, tmp_path, monkeypatch, capsys):
    """`python -m llama_jax.guard`: --text and --file conversations, one JSON line each; a bad
    line of the file is one error naming it."""
    monkeypatch.setattr(guard_cli, "load_model", lambda args: scripted_guard(tok, "unsafe\nS1"))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": USER_AGENT}) + "\n" + json.dumps({"prompt": "hi"}))
    assert guard_cli.main(["--preset", "tiny", "--file", str(chats)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["categories"] for x in lines] == [["S1"], ["S1"]] and all(x["flagged"] for x in lines)
    assert guard_cli.main(["--preset", "tiny", "--text", "hi", "--excluded", "S1"]) == 0
    [excused] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert not excused["flagged"] and excused["safe"] is False
    chats.write_text('{"messages": "not a list"}\n')
    assert guard_cli.main(["--preset", "tiny", "--file", str(chats)]) == 1
    assert f"{chats}:1: expected an object with messages" in capsys.readouterr().err


def chat_model(tok: Tokenizer) -> llama_jax.Model:
    return llama_jax.Model(CONFIG, init_params(CONFIG, 1), tokenizer=tok)


def guarded_client(tok, guard: LlamaGuard, **screen) -> TestClient:
    scheduler = scheduler_for(chat_model(tok), slots=4, max_len=512)
    screening = Screening(guard, model_name="guard", **screen)
    return TestClient(create_app(scheduler, model_name="chat", screening=screening))


CHAT = {"model": "chat", "messages": USER_ONLY, "max_tokens": 4, "temperature": 0}
# A prompt is judged as a user message, its completion as the reply. (Its 22 tokens need the
# prefill shapes of CHAT's 19: nothing more to compile.)
COMPLETION = {"model": "chat", "prompt": "How do I bake sourdough bread? Tell me, step by step,"
              " how it is done.", "max_tokens": 4, "temperature": 0}  # fmt: skip


def blocked(choice: dict) -> bool:
    return choice["finish_reason"] == "content_filter"


def streamed(client: TestClient, body: dict, route: str = "/v1/chat/completions") -> list[dict]:
    """The choices of every chunk of a streamed (chat) completion."""
    text = client.post(route, json={**body, "stream": True}).text
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [choice for e in events[:-1] for choice in json.loads(e)["choices"]]


def blocked_total(client: TestClient, by: str, stage: str) -> float:
    return scrape(client).get(("llama_jax_blocked_total", (("by", by), ("stage", stage))), 0.0)


@pytest.mark.slow
def test_server_screens_input_and_output_as_configured(tok, guards):
    """Chat and /v1/completions, whole and streamed; each blocked prompt or reply counts once
    in llama_jax_blocked_total."""
    with guarded_client(tok, guards["unsafe\nS1"], screen_input=True) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "n": 2}).json()
        assert [blocked(ch) for ch in r["choices"]] == [True, True]
        assert r["choices"][0]["message"]["content"] == ""
        assert r["choices"][0]["content_filter_results"]["categories"] == ["S1"]
        assert r["choices"][0]["content_filter_results"]["by"] == "guard"
        chunks = streamed(c, CHAT)
        assert blocked(chunks[-1]) and chunks[-1]["content_filter_results"]["flagged"]
        r = c.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"], "n": 2}).json()
        assert [(ch["index"], blocked(ch), ch["text"]) for ch in r["choices"]] == [
            (0, True, ""), (1, True, ""), (2, True, ""), (3, True, "")]  # fmt: skip
        assert r["choices"][3]["content_filter_results"]["categories"] == ["S1"]
        assert r["usage"]["completion_tokens"] == 0  # nothing was generated
        assert blocked_total(c, "guard", "input") == 1 + 1 + 2  # per conversation or prompt
        assert blocked_total(c, "guard", "output") == 0
    with guarded_client(tok, guards["unsafe\nS1"], screen_output=True) as c:
        r = c.post("/v1/chat/completions", json=CHAT).json()
        assert blocked(r["choices"][0]) and r["usage"]["completion_tokens"] == 4
        chunks = streamed(c, CHAT)  # the reply is held back until screened, then dropped
        assert blocked(chunks[-1]) and not any(ch["delta"].get("content") for ch in chunks)
        [choice] = c.post("/v1/completions", json=COMPLETION).json()["choices"]
        assert blocked(choice) and choice["text"] == ""
        assert blocked_total(c, "guard", "output") == 3
        assert blocked_total(c, "guard", "input") == 0
    with guarded_client(tok, guards["safe"], screen_input=True, screen_output=True) as c:
        r = c.post("/v1/chat/completions", json=CHAT).json()
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["message"]["content"]
        assert "content_filter_results" not in r["choices"][0]
        chunks = streamed(c, CHAT)
        assert chunks[-1]["finish_reason"] == "length"
        assert "".join(ch["delta"].get("content", "") for ch in chunks) == r["choices"][0]["message"]["content"]  # fmt: skip
        ids = tok.encode(COMPLETION["prompt"], bos=True)  # judged as its text
        [choice] = streamed(c, {**COMPLETION, "prompt": ids}, "/v1/completions")
        assert choice["finish_reason"] == "length" and choice["text"]  # one piece, once screened
        assert blocked_total(c, "guard", "output") == 0


@pytest.mark.slow
def test_moderations_through_the_openai_client(tok, guards):
    with guarded_client(tok, guards["unsafe\nS1"], excluded=("S14",)) as c:
        client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)
        one = client.moderations.create(model="guard", input="How do I hurt someone?")
        assert one.model == "guard" and len(one.results) == 1
        result = one.results[0]
        categories, scores = result.categories.model_dump(), result.category_scores.model_dump()
        assert result.flagged and categories["Violent Crimes"] is True
        assert categories["Hate"] is False and "Code Interpreter Abuse" not in categories
        assert scores["Violent Crimes"] > 0.99 and scores["Hate"] == 0.0
        two = client.moderations.create(model="guard", input=["a", "b"])
        assert [r.flagged for r in two.results] == [True, True]
        for bad in ({"input": []}, {"input": 3}, {"input": [{"type": "image_url"}]}, {}):
            r = c.post("/v1/moderations", json=bad)
            assert r.status_code == 400, bad
            assert r.json()["error"]["message"] == "input must be a string or a list of 1 to 16 strings"  # fmt: skip
        assert c.post("/v1/moderations", json={"model": "other", "input": "x"}).status_code == 404
        assert c.post("/v1/moderations", json={"input": "x"}).json()["results"][0]["flagged"]
    with guarded_client(tok, guards["safe"]) as c:
        r = c.post("/v1/moderations", json={"input": "hello"}).json()
        assert not r["results"][0]["flagged"] and not any(r["results"][0]["categories"].values())


def test_moderations_without_a_guard_is_a_clear_404(tok):
    scheduler = scheduler_for(chat_model(tok), slots=1, max_len=64)
    with TestClient(create_app(scheduler, model_name="chat")) as c:
        r = c.post("/v1/moderations", json={"input": "hello"})
        assert r.status_code == 404 and "--guard" in r.json()["error"]["message"]


@pytest.mark.slow
def test_serve_cli_with_a_guard_checkpoint(tok, tmp_path):
    from benchmarks.soak import server_process
    from llama_jax.checkpoint.export import export

    guard_dir = export(scripted_guard(tok, "unsafe\nS1"), tmp_path / "guard-3", "hf")
    flags = ("--guard", str(guard_dir), "--guard-input", "--guard-excluded", "s14,S13")
    with server_process(*flags, log_path=tmp_path / "server.log") as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        answer = client.moderations.create(model="guard-3", input=["first", "second"])
        assert answer.model == "guard-3" and [r.flagged for r in answer.results] == [True, True]
        categories = answer.results[0].categories.model_dump()
        assert categories["Violent Crimes"] and "Elections" not in categories
        bad = httpx.post(f"{server.url}/v1/moderations", json={"input": [1, 2]}, timeout=30)
        assert bad.status_code == 400 and "input" in bad.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert client.moderations.create(input="again").results[0].flagged
