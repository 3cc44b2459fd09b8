"""`python -m benchmarks.soak [--requests 2000] [--clients 64] [--out soak.json]`

A bounded soak of the OpenAI server as a real process on loopback (random `tiny` weights, an
API key): `--requests` completions from `--clients` concurrent asyncio + httpx clients, of
which 10% disconnect after their first streamed chunk and 5% are malformed JSON or carry a
wrong key. It fails (exit 1) unless the server stays up, every completed greedy response equals
the single-request answer to its prompt, every refused one got its 4xx, nothing runs at the end
(the scheduler's gauges on `/metrics`) and the server's RSS after the run is within 5% of its
RSS after warm-up (a leak per request would show at this count). Prints requests/s, latency
percentiles and the RSS figures as JSON.

Warm-up asks every prompt alone (the reference answers) and then runs rounds of other seeds'
cases concurrently (a quarter of the soak's size, at least 8 per client) until a round grows
the RSS by under 1%, so the batch shapes the soak needs are compiled before the first reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
MODEL = "soak"
PROMPTS = 32  # distinct prompts, so equal answers cannot come from mixing
RSS_TOLERANCE = 0.05
WARM_GROWTH, WARM_ROUNDS = 0.01, 8  # warm-up ends once a round grows RSS by under 1%
Kind = str  # "ok" | "disconnect" | "malformed" | "unauthorised"
Prompts = Sequence[tuple[list[int], int]]  # (prompt ids, max_tokens) of each distinct prompt
Answers = Sequence[list[int] | None]  # the single-request answer to each prompt


@dataclass(frozen=True)
class Case:
    kind: Kind
    prompt: int  # index into the prompts
    stream: bool


@dataclass(frozen=True)
class Outcome:
    case: Case
    seconds: float
    tokens: list[int] | None  # None: no complete answer (refused or disconnected)
    status: int


def workload(seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of each distinct prompt."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(1, 500, size=int(rng.integers(4, 40))).tolist(), int(rng.integers(8, 32)))
        for _ in range(PROMPTS)
    ]


def plan(n: int, seed: int = 0) -> list[Case]:
    """`n` cases in a seeded order: 85% answered (half streamed), 10% disconnecting, 2.5% each
    malformed and unauthorised."""
    rng = np.random.default_rng(seed + 1)
    draws = rng.random(n)
    kinds = np.select(
        [draws < 0.10, draws < 0.125, draws < 0.15], ["disconnect", "malformed", "unauthorised"],
        "ok",
    )  # fmt: skip
    prompts, streams = rng.integers(0, PROMPTS, n), rng.random(n) < 0.5
    return [
        Case(str(k), int(p), bool(s) or k == "disconnect")
        for k, p, s in zip(kinds, prompts, streams, strict=True)
    ]


# --- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(*flags: str, log_path: Path | None = None) -> Iterator[ServerProcess]:
    """`python -m llama_jax.infer serve --preset tiny` on a free loopback port, ready; stopped
    with SIGTERM (then killed) on leaving."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_jax.infer", "serve", "--preset", "tiny",
           "--port", str(port), "--model-name", MODEL, *flags]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = open(log_path or os.devnull, "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}")
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        out.close()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def gauges(self) -> dict[str, float]:
        """The unlabelled samples on `/metrics` (the gauges and token counters) by name."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.labels
        }

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """The gauges once nothing waits, runs or holds KV blocks (disconnects are noticed
        and cancelled asynchronously); raises if that takes over `timeout` seconds."""
        deadline = time.time() + timeout
        while True:
            gauges = self.gauges()
            busy = {k: gauges[f"llama_jax_{k}"] for k in IDLE_GAUGES}
            if not any(busy.values()):
                return gauges
            if time.time() > deadline:
                raise AssertionError(f"still busy after the run: {busy}")
            time.sleep(0.2)


IDLE_GAUGES = ("waiting_requests", "running_sequences", "kv_blocks_in_use")


# --- the clients ---------------------------------------------------------------------------


def body(prompt: list[int], max_tokens: int, stream: bool) -> dict[str, Any]:
    """Greedy, `max_tokens` exactly (no stop ids), token ids out through `logprobs: 0`."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "logprobs": 0, "stop_token_ids": []}  # fmt: skip


def ids(tokens: Sequence[str]) -> list[int]:
    return [int(t.strip("<>")) for t in tokens]


async def send(client: httpx.AsyncClient, case: Case, prompts: Prompts) -> Outcome:
    start = time.perf_counter()
    auth = {"Authorization": f"Bearer {'wrong' if case.kind == 'unauthorised' else KEY}"}
    if case.kind == "malformed":
        r = await client.post("/v1/completions", content=b'{"prompt": [1, 2', headers=auth)
        return Outcome(case, time.perf_counter() - start, None, r.status_code)
    payload = body(*prompts[case.prompt], case.stream)
    if not case.stream:
        r = await client.post("/v1/completions", json=payload, headers=auth)
        tokens = ids(r.json()["choices"][0]["logprobs"]["tokens"]) if r.status_code == 200 else None
        return Outcome(case, time.perf_counter() - start, tokens, r.status_code)
    tokens: list[int] = []
    async with client.stream("POST", "/v1/completions", json=payload, headers=auth) as r:
        async for line in r.aiter_lines():
            if case.kind == "disconnect" and tokens:
                return Outcome(case, time.perf_counter() - start, None, r.status_code)
            if line.startswith("data: {"):
                tokens += ids(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
    complete = r.status_code == 200 and case.kind == "ok"
    return Outcome(case, time.perf_counter() - start, tokens if complete else None, r.status_code)


async def run_clients(
    url: str, cases: Sequence[Case], clients: int, prompts: Prompts
) -> list[Outcome]:
    """`cases` in order, from `clients` concurrent workers."""
    queue = iter(cases)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for case in queue:
            outcomes.append(await send(client, case, prompts))

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return outcomes


EXPECTED_STATUS = {"ok": 200, "disconnect": 200, "malformed": 400, "unauthorised": 401}


def check(outcomes: Sequence[Outcome], reference: Answers) -> None:
    """Every answer equals its single-request one; every refusal has its status."""
    for o in outcomes:
        want = EXPECTED_STATUS[o.case.kind]
        if o.status != want:
            raise AssertionError(f"{o.case}: HTTP {o.status}, expected {want}")
        if o.case.kind == "ok" and o.tokens != reference[o.case.prompt]:
            raise AssertionError(f"{o.case}: {o.tokens} != {reference[o.case.prompt]}")


def warm_up(
    server: ServerProcess, clients: int, prompts: Prompts, reference: Answers, size: int
) -> tuple[int, int]:
    """Concurrent rounds of `size` cases (other seeds than the soak's) until the server's RSS
    grows by under WARM_GROWTH in a round; returns that RSS and the rounds run. Which batch
    shapes get compiled depends on timing, so one round is not always enough."""
    rss = server.rss()
    for seed in range(1, WARM_ROUNDS + 1):
        check(asyncio.run(run_clients(server.url, plan(size, seed), clients, prompts)), reference)
        server.wait_idle()
        rss, before = server.rss(), rss
        if rss < before * (1 + WARM_GROWTH):
            break
    return rss, seed


def soak(requests: int, clients: int, *, max_batch: int = 16, log_path: Path | None = None) -> dict:
    """The soak of the module doc; raises AssertionError on a failed check."""
    prompts, cases = workload(), plan(requests)
    flags = ("--api-key", KEY, "--max-batch", str(max_batch), "--max-seq-len", "256",
             "--max-waiting", str(2 * clients), "--quiet")  # fmt: skip
    with server_process(*flags, log_path=log_path) as server:
        alone = [Case("ok", i, False) for i in range(PROMPTS)]
        reference = [o.tokens for o in asyncio.run(run_clients(server.url, alone, 1, prompts))]
        rss_warm, rounds = warm_up(
            server, clients, prompts, reference, max(requests // 4, 8 * clients)
        )
        start = time.perf_counter()
        outcomes = asyncio.run(run_clients(server.url, cases, clients, prompts))
        wall = time.perf_counter() - start
        alive = server.proc.poll() is None and httpx.get(f"{server.url}/health").status_code == 200
        if not alive:
            raise AssertionError("the server went down during the soak")
        check(outcomes, reference)
        server.wait_idle()
        rss_end = server.rss()
    answered = [o.seconds for o in outcomes if o.case.kind == "ok"]
    report = {
        "requests": requests,
        "clients": clients,
        "by_kind": {k: sum(o.case.kind == k for o in outcomes) for k in EXPECTED_STATUS},
        "requests_per_s": round(requests / wall, 2),
        "latency_p50_s": round(float(np.percentile(answered, 50)), 4),
        "latency_p99_s": round(float(np.percentile(answered, 99)), 4),
        "warmup_rounds": rounds,
        "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
        "rss_after_run_mb": round(rss_end / 2**20, 1),
    }
    growth = rss_end / rss_warm - 1
    report["rss_growth"] = round(growth, 4)
    if growth > RSS_TOLERANCE:
        raise AssertionError(f"RSS grew {growth:.1%} over the soak: {report}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__.split("\n\n")[1])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16, help="the server's decode slots")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        report = soak(args.requests, args.clients, max_batch=args.max_batch)
    except AssertionError as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
