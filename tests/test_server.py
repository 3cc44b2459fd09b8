"""The OpenAI-compatible server as a real process on loopback, driven by the `openai` client.

A random model would never produce a tool call, so the checkpoint here is "scripted": a tiny
Llama 3-vocabulary model whose weights make the assistant header's last token ("\\n\\n") start
a fixed chain of tokens spelling a `get_weather` call and ending in <|eot_id|>. Chain tokens
own reserved embedding dimensions that no layer writes to, so the chain is exact while every
other token behaves like a random model (varied outputs for the concurrency test).
The interactive chat CLI is tested here too, on the same checkpoint.
"""

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

import llama_jax
from llama_jax.checkpoint.export import export
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CALL = '{"name":"get_weather","parameters":{"city": "Paris"}}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONFIG = llama_jax.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128256, max_seq_len=512
)
NAME = "scripted"


def scripted_params(tok: Tokenizer) -> dict:
    """Random weights plus a chain "\\n\\n" -> tokens of CALL -> <|eot_id|> (see module doc)."""
    params = jax.tree.map(np.array, init_params(CONFIG, 0))
    chain = tok.encode("\n\n") + [t for p in _call_pieces() for t in tok.encode(p)]
    assert len(set(chain)) == len(chain) and tok.decode(chain[1:]) == CALL
    following = [*chain[1:], tok.eot_id]
    k = len(chain)
    emb, out = params["tok_embeddings"], params["output"]
    emb[:, :k] = 0
    out[:k] = 0
    params["layers"]["attention"]["wo"][..., :k] = 0
    params["layers"]["feed_forward"]["w2"][..., :k] = 0
    for j, (token, nxt) in enumerate(zip(chain, following, strict=True)):
        emb[token] = 0
        emb[token, j] = 4.0
        out[j, nxt] = 5.0
    return params


def _call_pieces() -> list[str]:
    """CALL cut so that every token id is distinct (a token maps to one successor)."""
    return ['{"', "name", '":"', "get", "_weather", '","', "parameters", '":{"', "city", '":',
            ' "', "Paris", '"}}']  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_assets) -> Path:
    tok = Tokenizer(shared_assets / "llama3" / "tokenizer.model")
    model = llama_jax.Model(CONFIG, scripted_params(tok), tokenizer=tok)
    return export(model, tmp_path_factory.mktemp("ckpt") / "scripted", "hf")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL, the file its stdout and stderr go to) of a server on the checkpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "llama_jax.infer", "serve", "--checkpoint", str(checkpoint),
           "--port", str(port), "--max-batch", "4", "--max-seq-len", "512",
           "--max-body-bytes", "65536", "--model-name", NAME]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, stream=False, **kw):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    return client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, stream=stream, **kw
    )


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_ready_line_and_one_access_line_per_request(server, client):
    url, log = server
    chat(client, max_tokens=3)
    client.models.list()
    lines = log.read_text().splitlines()
    assert lines[0] == f"serving {NAME!r} at {url}/v1 (OpenAI API; Ctrl-C to stop)"
    assert any(re.fullmatch(r"GET /v1/models 200 \d+\.\d{3}s", x) for x in lines), lines
    pattern = r"POST /v1/chat/completions 200 tokens (\d+)\+3 \d+\.\d{3}s"
    assert any(re.fullmatch(pattern, x) for x in lines), lines


def test_chat_plain_and_streaming(client):
    reply = chat(client)
    choice = reply.choices[0]
    assert choice.message.content == CALL and not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == 14  # 13 tokens of CALL and <|eot_id|>
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CALL
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    streamed = chunks[-1].usage
    assert streamed.model_dump(exclude={"prompt_tokens_details"}) == reply.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    # The second time, the prefix cache serves the prompt's full blocks but the last token's.
    cached = streamed.prompt_tokens_details.cached_tokens
    assert reply.usage.prompt_tokens - 16 <= cached < reply.usage.prompt_tokens


def test_tool_call_plain_and_streaming(client):
    choice = chat(client, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(chat(client, stream=True, tools=TOOLS))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back in the conversation (OpenAI's message shapes).
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    again = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS)
    assert again.usage.prompt_tokens > chat(client, tools=TOOLS).usage.prompt_tokens
    bad = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, messages=bad)


def test_completions_text_ids_and_logprobs(client):
    a = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 6
    ids = [128000, 12805, 5304, 264, 892]  # the same prompt as token ids
    b = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    assert b.choices[0].text == a.choices[0].text
    lp = b.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == a.choices[0].text


def test_sixteen_concurrent_streams_match_single_answers(client, base_url):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 100000, size=int(n)).tolist() for n in rng.integers(3, 16, 16)]
    single = [
        client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0).choices[0]
        for p in prompts
    ]

    async def stream(aclient, prompt):
        pieces = []
        response = await aclient.completions.create(
            model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        async for chunk in response:
            pieces.append(chunk.choices[0].text)
        return "".join(pieces)

    async def all_streams():
        aclient = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    streamed = asyncio.run(all_streams())
    assert streamed == [c.text for c in single]
    assert len(set(streamed)) > 8  # distinct prompts, distinct answers: nothing got mixed


def test_bad_requests_get_4xx_json_and_server_stays_up(base_url):
    url = f"{base_url}/v1/completions"
    cases = [
        (b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
        (json.dumps({"prompt": "hi", "max_tokens": -5}), 400, "max_tokens"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}), 400, "temperature"),
        (json.dumps({"prompt": "hi", "max_tokens": 100000}), 400, "max_tokens must be <="),
        (json.dumps({"prompt": [5] * 600}), 400, "prompt has 600 tokens"),
        (json.dumps({"prompt": "hi", "model": "gpt-4"}), 404, "not found"),
        (json.dumps({"prompt": "x" * 70000}), 413, "at most 65536 bytes"),
        (json.dumps({"prompt": "hi", "presence_penalty": 2.5}), 400, "presence_penalty"),
        (json.dumps({"prompt": "hi", "frequency_penalty": -3}), 400, "frequency_penalty"),
        (json.dumps({"prompt": "hi", "repetition_penalty": 0}), 400, "repetition_penalty"),
        (json.dumps({"prompt": "hi", "logit_bias": {"abc": 1}}), 400, "logit_bias"),
        (json.dumps({"prompt": "hi", "logit_bias": {"5": 150}}), 400, "logit_bias"),
        (json.dumps({"prompt": "hi", "logit_bias": {"5": "x"}}), 400, "logit_bias"),
        (json.dumps({"prompt": "hi", "logit_bias": {"200000": 1}}), 400, "logit_bias"),
        (
            json.dumps({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}),
            400,
            "logit_bias",
        ),
        (json.dumps({"prompt": "hi", "n": 17}), 400, "n: Input should be less than or equal"),
        (json.dumps({"prompt": "hi", "n": 0}), 400, "n: Input should be greater than or equal"),
    ]
    headers = {"content-type": "application/json"}
    for body, status, message in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (body[:60], r.text)
        assert message in r.json()["error"]["message"]

    def chunked():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(url, content=chunked(), headers=headers, timeout=30)  # no Content-Length
    assert r.status_code == 413 and "at most 65536 bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": "hi"}, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_penalties_and_logit_bias_are_accepted(client):
    extra = {"repetition_penalty": 1.1}
    reply = client.completions.create(
        model=NAME, prompt=[7, 8, 9], max_tokens=2, temperature=0, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"5": 10, "6": -100}, extra_body=extra,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "length"


def test_n_seeded_choices_repeat_differ_and_are_numbered_per_prompt(client, base_url):
    def texts(prompt, n, **kw):
        reply = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=4, temperature=1.0, seed=11, n=n,
            extra_body={"stop_token_ids": []}, **kw,
        )  # fmt: skip
        assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
        return [c.text for c in reply.choices], reply.usage

    four, use = texts([7, 8, 9], 4)
    assert len(four) == 4 and len(set(four)) > 1  # each choice draws with its own seed
    assert texts([7, 8, 9], 4)[0] == four  # and the seeds are derived from `seed`
    assert texts([7, 8, 9], 1)[0] == four[:1]  # choice 0 keeps the seed itself
    assert (use.prompt_tokens, use.completion_tokens) == (3, 16)  # the prompt counts once
    # Two prompts, two choices each: index = prompt index * n + choice.
    two, use = texts([[7, 8, 9], [20, 21]], 2)
    assert two[:2] == four[:2] and two[2:] == texts([20, 21], 2)[0]
    assert (use.prompt_tokens, use.completion_tokens) == (5, 16)
    streamed = ["", "", "", ""]
    body = {"model": NAME, "prompt": [[7, 8, 9], [20, 21]], "max_tokens": 4, "seed": 11,
            "temperature": 1.0, "n": 2, "stop_token_ids": [], "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                streamed[choice["index"]] += choice["text"]
    assert streamed == two


def test_chat_n_choices_plain_and_streaming(client):
    one, two = chat(client), chat(client, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [CALL, CALL]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    texts, finishes = ["", ""], [None, None]
    for c in chat(client, stream=True, n=2):
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = finishes[choice.index] or choice.finish_reason
    assert texts == [CALL, CALL] and finishes == ["stop", "stop"]


def test_client_disconnect_frees_its_slot(base_url):
    body = {"model": NAME, "prompt": [7, 8, 9], "max_tokens": 500, "stream": True,
            "temperature": 0, "stop_token_ids": []}  # fmt: skip
    before = httpx.get(f"{base_url}/health").json()["finished"].get("cancelled", 0)
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(f"{base_url}/health").json()
        if health["finished"].get("cancelled", 0) > before and health["load"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"request was not cancelled: {health}")


# --- the chat CLI on the same checkpoint ---------------------------------------------------


def run_chat(checkpoint, monkeypatch, capsys, lines, *flags):
    from infer.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    code = main(["--checkpoint", str(checkpoint), "--chat", "--max-seq-len", "512", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_chat_cli_streams_replies_and_shows_tool_calls(checkpoint, monkeypatch, capsys, tmp_path):
    out = run_chat(checkpoint, monkeypatch, capsys, ["hello", "/reset", "hi again"])
    assert out.splitlines() == [CALL, CALL]
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    out = run_chat(checkpoint, monkeypatch, capsys, ["weather in Paris?"], "--tools", str(tools))
    assert out.strip() == '[tool call] get_weather({"city": "Paris"})'
    out = run_chat(checkpoint, monkeypatch, capsys, ["weather?", "/tool sunny", "/exit"],
                   "--tools", str(tools), "--json")  # fmt: skip
    turns = [json.loads(line) for line in out.splitlines()]
    assert [t["message"]["tool_calls"][0]["function"]["name"] for t in turns] == ["get_weather"] * 2
    assert turns[0]["finish_reason"] == "stop" and turns[1]["prompt_ids"][:1] == [128000]


def test_piped_chat_shows_its_banner_and_turns_and_warns_once_of_a_cap(
    checkpoint, monkeypatch, capsys
):
    from infer.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhi again\n"))
    code = main(["--checkpoint", str(checkpoint), "--chat", "--max-seq-len", "512",
                 "--max-new-tokens", "600"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines() == [CALL, CALL]
    err = out.err.splitlines()
    assert err[0].startswith("chat: /reset forgets") and "> hello" in err and "> hi again" in err
    capped = [x for x in err if "warning: --max-new-tokens 600 does not fit" in x]
    assert len(capped) == 1 and "(--max-seq-len 512) leaves" in capped[0], err


def test_generate_api_text_in_text_out(checkpoint):
    from infer.generate import generate
    from llama_jax.checkpoint.load import load

    model = load(checkpoint)
    prompt = "Call a tool\n\n"  # ends in the token "\n\n", which starts the scripted call
    assert model.tokenizer.encode(prompt)[-1] == 271
    full = generate(model, prompt, max_new_tokens=20)
    cut = generate(model, prompt, max_new_tokens=20, stop=['"city"'])
    assert full.text == CALL and full.finish_reason == "stop"
    assert full.token_ids[-1] == model.tokenizer.eot_id and len(full.token_ids) == 14
    assert cut.text == CALL[: CALL.index('"city"')] and cut.finish_reason == "stop"
