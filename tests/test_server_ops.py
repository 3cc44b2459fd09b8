"""The server's operations side: API key, Prometheus metrics, request timeout, SIGTERM drain
and a bounded soak.

In-process tests drive the app through Starlette's TestClient (which runs the lifespan, so the
scheduler thread runs) over random `tiny` weights; the drain and the soak run the server as a
real process (`benchmarks.soak.server_process`).
"""

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.soak import server_process, soak
from infer.batching import Scheduler, scheduler_for
from infer.server import Limits, create_app
from llama_jax.api import init
from llama_jax.config import preset

KEY = "sesame"
MODEL = "tiny"


@pytest.fixture(scope="module")
def model():
    return init(preset("tiny"))


def make_client(model, **app_options) -> tuple[TestClient, Scheduler]:
    scheduler = scheduler_for(model, slots=4, max_len=1024)
    app = create_app(scheduler, model_name=MODEL, **app_options)
    return TestClient(app), scheduler


@pytest.fixture(scope="module")
def keyed(model) -> Iterator[tuple[TestClient, Scheduler]]:
    client, scheduler = make_client(model, api_key=KEY)
    with client:
        yield client, scheduler


def completion(n_tokens: int, prompt=(5, 6, 7), **extra) -> dict:
    return {"model": MODEL, "prompt": list(prompt), "max_tokens": n_tokens, "temperature": 0,
            "stop_token_ids": [], **extra}  # fmt: skip


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_idle(scheduler: Scheduler, timeout: float = 10) -> None:
    """Until `check_idle` passes (a cancellation is handled at the scheduler's next step)."""
    deadline = time.time() + timeout
    while True:
        try:
            return scheduler.check_idle()
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def test_api_key_guards_v1_routes_only(keyed):
    client, _ = keyed
    missing = client.post("/v1/completions", json=completion(2))
    wrong = client.post("/v1/completions", json=completion(2), headers=bearer("sesame!"))
    for r in (missing, wrong, client.get("/v1/models", headers={"Authorization": KEY})):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["param"] is None
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["message"] == "incorrect API key"
    ok = client.post("/v1/completions", json=completion(2), headers=bearer(KEY))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/metrics").status_code == 200


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics, by (name, sorted labels)."""
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_and_pool(model):
    client, scheduler = make_client(model)
    with client:
        lengths, prompts = [3, 5, 8], [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
        for n, prompt in zip(lengths, prompts, strict=True):
            assert client.post("/v1/completions", json=completion(n, prompt)).status_code == 200
        streamed = client.post("/v1/completions", json=completion(4, stream=True))
        assert streamed.text.endswith("data: [DONE]\n\n")
        assert client.post("/v1/completions", json={"prompt": []}).status_code == 400
        client.get("/nowhere")
        m = scrape(client)
    completions = ("route", "/v1/completions")
    assert m[("llama_jax_requests_total", (completions, ("status", "200")))] == 4
    assert m[("llama_jax_requests_total", (completions, ("status", "400")))] == 1
    assert m[("llama_jax_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert m[("llama_jax_prompt_tokens_total", ())] == 3 + 2 + 4 + 3
    assert m[("llama_jax_generated_tokens_total", ())] == 3 + 5 + 8 + 4
    # A first token per request; every later token has a gap.
    assert m[("llama_jax_time_to_first_token_seconds_count", ())] == 4
    assert m[("llama_jax_inter_token_latency_seconds_count", ())] == 2 + 4 + 7 + 3
    assert m[("llama_jax_running_sequences", ())] == 0
    assert m[("llama_jax_waiting_requests", ())] == 0
    assert m[("llama_jax_kv_blocks_in_use", ())] == 0
    assert m[("llama_jax_kv_blocks_total", ())] == scheduler.blocks.num_blocks


def test_request_timeout_cancels_and_frees_everything(model):
    client, scheduler = make_client(model, limits=Limits(request_timeout=0.2))
    with client:
        long = completion(1000)
        start = time.perf_counter()
        r = client.post("/v1/completions", json=long)
        assert r.status_code == 408 and time.perf_counter() - start < 5
        assert r.json()["error"] == {"message": "request timed out after 0.2s",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_timeout"}  # fmt: skip
        wait_idle(scheduler)
        streamed = client.post("/v1/completions", json={**long, "stream": True})
        events = [x[6:] for x in streamed.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert all("choices" in json.loads(e) for e in events[:-2])
        wait_idle(scheduler)
        assert scheduler.finished["cancelled"] == 2
        short = client.post("/v1/completions", json=completion(2))  # well inside the timeout
        assert short.status_code == 200


def test_drain_past_its_deadline_ends_streams_with_a_cancelled_chunk(model):
    client, scheduler = make_client(model)
    with client:
        drain = client.app.state.drain
        body = completion(1000, logprobs=0, stream=True)
        replies: list[httpx.Response] = []
        stream = threading.Thread(
            target=lambda: replies.append(client.post("/v1/completions", json=body))
        )
        stream.start()
        deadline = time.time() + 60
        while not drain.active or not scheduler.load:
            assert time.time() < deadline
            time.sleep(0.01)
        client.portal.call(drain.run, 0.05)
        stream.join(30)
        assert drain.active == 0 and client.get("/health").status_code == 503
        wait_idle(scheduler)
    events = [x[6:] for x in replies[0].text.split("\n\n") if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
    assert len(events) - 1 < 1000


def wait_draining(url: str, timeout: float = 10) -> httpx.Response:
    """/health once it reports the drain (the signal is handled asynchronously)."""
    deadline = time.time() + timeout
    while (health := httpx.get(f"{url}/health", timeout=10)).status_code == 200:
        assert time.time() < deadline, "the server did not start draining"
        time.sleep(0.01)
    return health


@pytest.mark.slow
def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(tmp_path):
    log = tmp_path / "log"
    with server_process("--shutdown-timeout", "30", log_path=log) as server:
        # `logprobs` makes every token a chunk (the model has no tokenizer, so no text).
        body = {**completion(1000, logprobs=0), "model": "soak", "stream": True}
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        health = wait_draining(server.url)
        refused = httpx.post(f"{server.url}/v1/completions", json=completion(2), timeout=10)
        reader.join(60)
        code = server.proc.wait(timeout=30)
    assert "draining: 1 requests in flight" in log.read_text()  # the stream was mid-way
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "server_error"
    events = [x[6:] for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 1000 + 1
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert code == 0


@pytest.mark.slow
def test_soak_small(tmp_path):
    report = soak(200, 16, max_batch=8, log_path=tmp_path / "log")
    assert report["by_kind"]["ok"] + report["by_kind"]["disconnect"] > 150
    assert report["rss_growth"] <= 0.05
