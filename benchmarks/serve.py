"""`python -m benchmarks.serve [--quick] [--only capacity,prefix,chunking] [--out serve.json]`

The OpenAI server under load: requests arrive as a seeded Poisson process with mixed prompt
and output lengths and are streamed over HTTP (`/v1/completions`, token ids in and, through
`logprobs`, token ids out), so every token's arrival time is seen by the client. Three
comparisons, each of two server configurations on the same trace:

- `capacity`: the paged KV cache against the contiguous layout (one whole-context row per
  slot) at the same KV byte budget; the headline is how many sequences run at once.
- `prefix`: the prefix cache on and off, on a multi-turn chat trace (each turn resends the
  conversation so far behind a shared system prompt), then the time to first token of a
  repeated long prefix, cold and again.
- `chunking`: the inter-token latency of running streams while long prompts arrive, with the
  prefill token budget per step small (chunked) and at least the longest prompt (not chunked).

The server runs in this process (uvicorn on a thread, the scheduler on its own), so the
scheduler's counters (most sequences at once, most KV blocks held, preemptions, cached tokens)
are read directly rather than through an endpoint. Each configuration replays its trace twice:
once with other token ids to compile the shapes the trace needs, then measured. Figures are
wall-clock on whatever machine runs it; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jax
import numpy as np
import uvicorn

from infer.batching import Scheduler, SchedulerStats, scheduler_for
from infer.server import Limits, create_app
from llama_jax import compile_cache
from llama_jax.api import Model, init
from llama_jax.config import preset

MODEL_NAME = "bench"
PRESET = "tiny"
SEED = 0


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the full benchmark or the `--quick` smoke version."""

    context: int  # tokens per sequence (the model's max_seq_len is set to this)
    pool_contexts: int  # the KV byte budget, in whole contexts (= the contiguous layout's slots)
    paged_slots: int  # decode rows of the paged configurations
    requests: int  # capacity trace
    rate: float  # capacity trace arrivals per second
    prompt_range: tuple[int, int]  # capacity trace prompt lengths (log-uniform)
    output_range: tuple[int, int]  # capacity trace output lengths (log-uniform)
    conversations: int
    turns: int
    system_len: int  # shared system prompt of the chat trace
    user_range: tuple[int, int]
    reply_range: tuple[int, int]
    chat_rate: float  # conversations starting per second
    think_s: float  # mean pause between a reply and the next turn
    repeat_prefix: int  # the long prefix sent cold and again
    streams: int  # chunking: streams decoding while long prompts arrive
    stream_output: int
    long_prompts: int
    long_len: int
    long_rate: float
    long_after: float  # seconds after the streams start (once they decode)
    chunk: int  # the chunked prefill budget
    warm: bool  # replay each trace once to compile before measuring


FULL = Scale(
    context=2048, pool_contexts=4, paged_slots=16,
    requests=64, rate=6.0, prompt_range=(16, 1024), output_range=(16, 256),
    conversations=8, turns=4, system_len=512, user_range=(32, 128), reply_range=(16, 64),
    chat_rate=1.0, think_s=0.3, repeat_prefix=2000,
    streams=4, stream_output=400, long_prompts=6, long_len=1800, long_rate=2.0, long_after=1.0,
    chunk=256,
    warm=True,
)  # fmt: skip
QUICK = Scale(
    context=128, pool_contexts=2, paged_slots=8,
    requests=8, rate=20.0, prompt_range=(4, 40), output_range=(2, 8),
    conversations=2, turns=2, system_len=32, user_range=(4, 12), reply_range=(2, 4),
    chat_rate=10.0, think_s=0.01, repeat_prefix=64,
    streams=2, stream_output=16, long_prompts=2, long_len=100, long_rate=20.0, long_after=0.05,
    chunk=16,
    warm=False,
)  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """One server configuration: the engine's KV layout and prefill budget, the prefix cache."""

    slots: int
    block_size: int
    num_blocks: int
    prefill_chunk: int
    prefix_cache: bool


@dataclass(frozen=True)
class Call:
    """One request of a trace: when it is sent (seconds after the start), what, and a tag
    saying which population of the trace it belongs to."""

    at: float
    prompt: list[int]
    max_tokens: int
    tag: str = "request"


@dataclass
class Result:
    """What the client saw of one streamed request (`time.perf_counter` seconds)."""

    tag: str
    sent: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None


# --- the server --------------------------------------------------------------------------


class Server:
    """The OpenAI app over a fresh scheduler, served by uvicorn on a thread of this process."""

    def __init__(self, model: Model, setup: Setup) -> None:
        self.scheduler: Scheduler = scheduler_for(
            model,
            slots=setup.slots,
            max_len=model.config.max_seq_len,
            max_waiting=4096,
            prefix_cache=setup.prefix_cache,
            block_size=setup.block_size,
            num_blocks=setup.num_blocks,
            prefill_chunk=setup.prefill_chunk,
        )
        limits = Limits(max_body_bytes=1 << 24, max_tokens=model.config.max_seq_len)
        app = create_app(self.scheduler, model_name=MODEL_NAME, limits=limits)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


# --- the client --------------------------------------------------------------------------


async def stream(
    client: httpx.AsyncClient, prompt: Sequence[int], max_tokens: int, tag: str
) -> Result:
    """One streamed completion. `logprobs: 0` makes every chunk carry its tokens (as `<id>`
    without a tokenizer); `stop_token_ids: []` makes every request generate `max_tokens`."""
    body = {
        "model": MODEL_NAME, "prompt": list(prompt), "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "logprobs": 0, "stop_token_ids": [],
    }  # fmt: skip
    result = Result(tag, time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                for choice in json.loads(line[6:])["choices"]:
                    for token in (choice.get("logprobs") or {}).get("tokens", []):
                        result.token_times.append(now)
                        result.token_ids.append(int(token.strip("<>")))
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def new_client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits)


async def replay(url: str, calls: Sequence[Call]) -> list[Result]:
    """Send every call at its time, concurrently; their results in the calls' order."""
    async with new_client(url) as client:
        start = time.perf_counter()

        async def one(call: Call) -> Result:
            await asyncio.sleep(max(0.0, start + call.at - time.perf_counter()))
            return await stream(client, call.prompt, call.max_tokens, call.tag)

        return list(await asyncio.gather(*(one(c) for c in calls)))


@dataclass(frozen=True)
class Conversation:
    """A chat of several turns: each turn sends the whole conversation so far (the system
    prompt, every earlier message and reply) plus a new user message."""

    at: float
    system: list[int]
    users: list[list[int]]
    replies: list[int]  # each turn's max_tokens
    pauses: list[float]  # think time after each reply


async def chat(url: str, conversations: Sequence[Conversation]) -> list[Result]:
    """Run the conversations concurrently, each turn after the previous reply and a pause."""
    async with new_client(url) as client:
        start = time.perf_counter()

        async def one(c: Conversation) -> list[Result]:
            await asyncio.sleep(max(0.0, start + c.at - time.perf_counter()))
            history, results = list(c.system), []
            for user, reply, pause in zip(c.users, c.replies, c.pauses, strict=True):
                history += user
                results.append(await stream(client, history, reply, "turn"))
                history += results[-1].token_ids
                await asyncio.sleep(pause)
            return results

        return [r for rs in await asyncio.gather(*(one(c) for c in conversations)) for r in rs]


# --- traces ------------------------------------------------------------------------------


def log_uniform(rng: np.random.Generator, bounds: tuple[int, int], n: int) -> list[int]:
    """Lengths spread evenly in log space: many short, some long, as real traffic is."""
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return np.rint(np.exp(rng.uniform(lo, hi, n))).astype(int).tolist()


def arrivals(rng: np.random.Generator, rate: float, n: int) -> list[float]:
    """A Poisson process: exponential gaps of mean 1 / rate, the first at 0."""
    return [0.0, *np.cumsum(rng.exponential(1 / rate, n - 1)).tolist()]


class Tokens:
    """Random token ids; a fresh seed gives the same trace shapes with other ids (warm-up)."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.rng = vocab, np.random.default_rng(seed)

    def __call__(self, n: int) -> list[int]:
        return self.rng.integers(1, self.vocab, n).tolist()


def capacity_trace(s: Scale, tokens: Tokens) -> list[Call]:
    rng = np.random.default_rng(SEED)
    times = arrivals(rng, s.rate, s.requests)
    prompts = log_uniform(rng, s.prompt_range, s.requests)
    outputs = log_uniform(rng, s.output_range, s.requests)
    return [Call(t, tokens(p), o) for t, p, o in zip(times, prompts, outputs, strict=True)]


def chat_trace(s: Scale, tokens: Tokens) -> list[Conversation]:
    rng = np.random.default_rng(SEED + 1)
    system = tokens(s.system_len)
    times = arrivals(rng, s.chat_rate, s.conversations)
    return [
        Conversation(
            at=t,
            system=system,
            users=[tokens(n) for n in log_uniform(rng, s.user_range, s.turns)],
            replies=log_uniform(rng, s.reply_range, s.turns),
            pauses=rng.exponential(s.think_s, s.turns).tolist(),
        )
        for t in times
    ]


def chunking_trace(s: Scale, tokens: Tokens) -> list[Call]:
    """Streams that start together, then long prompts arriving while they decode (a short
    `max_tokens` each: it is their prefill that the streams feel)."""
    rng = np.random.default_rng(SEED + 2)
    calls = [Call(0.0, tokens(32), s.stream_output, "stream") for _ in range(s.streams)]
    times = arrivals(rng, s.long_rate, s.long_prompts)
    return calls + [Call(s.long_after + t, tokens(s.long_len), 4, "long") for t in times]


# --- figures -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if values else None


def latency(results: Sequence[Result]) -> dict[str, Any]:
    """TTFT (request sent to its first token) and inter-token gaps, as the client saw them."""
    ok = [r for r in results if r.error is None and r.token_times]
    ttft = [r.token_times[0] - r.sent for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "itl_max_s": round(max(gaps), 6) if gaps else None,
    }


def figures(results: Sequence[Result], server: Server, setup: Setup, new_shapes: int) -> dict:
    """One configuration's report: throughput and latency from the client's results, peak
    concurrency and KV memory from the scheduler's counters (reset before the measured pass).
    `new_shapes` counts the call shapes the warm-up pass did not see (each compiled then)."""
    ok = [r for r in results if r.error is None and r.token_times]
    tokens = sum(len(r.token_ids) for r in ok)
    wall = max(r.token_times[-1] for r in ok) - min(r.sent for r in results) if ok else 0.0
    stats: SchedulerStats = server.scheduler.stats
    per_block = server.scheduler.engine.kv_bytes_per_block
    tags = sorted({r.tag for r in results})
    return {
        "setup": dataclasses.asdict(setup),
        "requests": len(results),
        "errors": [r.error for r in results if r.error is not None],
        "output_tokens": tokens,
        "wall_s": round(wall, 4),
        "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        **latency(results),
        "max_concurrent": stats.peak_running,
        "peak_kv_blocks": stats.peak_blocks,
        "kv_bytes_per_block": per_block,
        "peak_kv_bytes": stats.peak_blocks * per_block,
        "pool_kv_bytes": setup.num_blocks * per_block,
        "preemptions": stats.preemptions,
        "prefilled_tokens": stats.prefilled_tokens,
        "cached_tokens": stats.cached_tokens,
        "new_shapes_while_measured": new_shapes,
        "prefill_budget": server.scheduler.engine.prefill_chunk,
        **(
            {"by_tag": {t: latency([r for r in results if r.tag == t]) for t in tags}}
            if len(tags) > 1
            else {}
        ),
    }


# --- the comparisons ---------------------------------------------------------------------


def measured(name: str, model: Model, setup: Setup, s: Scale, play, extra=None) -> dict[str, Any]:
    """Serve `setup`, replay `play(url, tokens)` once to compile (with other ids) when the
    scale says so, reset the counters, replay it measured; `extra(server)` adds figures."""
    vocab = model.config.vocab_size
    print(f"{time.strftime('%H:%M:%S')} {name}: {setup}", file=sys.stderr, flush=True)
    with Server(model, setup) as server:
        if s.warm:
            asyncio.run(play(server.url, Tokens(vocab, SEED + 100)))
        server.scheduler.stats = SchedulerStats()
        seen = len(server.scheduler.engine.compiles)
        results = asyncio.run(play(server.url, Tokens(vocab, SEED + 200)))
        new_shapes = len(server.scheduler.engine.compiles) - seen
        out = figures(results, server, setup, new_shapes)
        if extra is not None:
            out |= extra(server)
        return out


def paged(s: Scale, **changes: Any) -> Setup:
    """The paged layout at the run's KV budget."""
    blocks = s.pool_contexts * s.context // 16
    return dataclasses.replace(Setup(s.paged_slots, 16, blocks, 512, True), **changes)


def capacity(model: Model, s: Scale) -> dict[str, Any]:
    def play(url: str, tokens: Tokens):
        return replay(url, capacity_trace(s, tokens))

    contiguous = Setup(s.pool_contexts, s.context, s.pool_contexts, 512, False)
    # Paged with the contiguous layout's decode rows too: what the layout costs per step,
    # apart from running more sequences at once.
    same_slots = paged(s, slots=s.pool_contexts)
    return {
        "paged": measured("capacity paged", model, paged(s), s, play),
        "paged_same_slots": measured("capacity paged_same_slots", model, same_slots, s, play),
        "contiguous": measured("capacity contiguous", model, contiguous, s, play),
    }


REPEATS = 3  # prefixes measured (medians reported): one TTFT is one sample of a noisy host


def repeat_prefix(server: Server, s: Scale) -> dict[str, Any]:
    """TTFT of a long prefix plus a short suffix, sent cold and then again with another
    suffix, for `REPEATS` prefixes. A first prefix (other ids) compiles both shapes."""
    tokens = Tokens(server.scheduler.engine.config.vocab_size, SEED + 300)

    async def pair(prefix: list[int]) -> list[float]:
        async with new_client(server.url) as client:
            results = [await stream(client, prefix + tokens(16), 4, "repeat") for _ in range(2)]
        for r in results:
            if not r.token_times:
                raise RuntimeError(f"a repeated-prefix request failed: {r.error}")
        return [r.token_times[0] - r.sent for r in results]

    asyncio.run(pair(tokens(s.repeat_prefix)))
    before = server.scheduler.stats.cached_tokens
    pairs = [asyncio.run(pair(tokens(s.repeat_prefix))) for _ in range(REPEATS)]
    cold, again = zip(*pairs, strict=True)
    return {
        "repeat_prefix_tokens": s.repeat_prefix,
        "repeat_ttft_cold_s": round(float(np.median(cold)), 6),
        "repeat_ttft_again_s": round(float(np.median(again)), 6),
        "repeat_cached_tokens": (server.scheduler.stats.cached_tokens - before) // REPEATS,
    }


def prefix(model: Model, s: Scale) -> dict[str, Any]:
    def play(url: str, tokens: Tokens):
        return chat(url, chat_trace(s, tokens))

    def extra(server: Server) -> dict[str, Any]:
        return repeat_prefix(server, s)

    return {
        "on": measured("prefix on", model, paged(s), s, play, extra),
        "off": measured("prefix off", model, paged(s, prefix_cache=False), s, play, extra),
    }


def chunking(model: Model, s: Scale) -> dict[str, Any]:
    """What matters is in `by_tag`: the streams' inter-token gaps, the long prompts' TTFTs."""

    def play(url: str, tokens: Tokens):
        return replay(url, chunking_trace(s, tokens))

    return {
        name: measured(f"chunking {name}", model, paged(s, prefill_chunk=budget), s, play)
        for name, budget in (("chunked", s.chunk), ("unchunked", s.long_len))
    }


EXPERIMENTS = {"capacity": capacity, "prefix": prefix, "chunking": chunking}


def table(report: dict[str, Any]) -> str:
    """The headline figures of every configuration as a markdown table."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1e3 * x:,.1f}"

    lines = [
        "| experiment | config | out tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| max concurrent | peak KV MiB (pool) | cached / prefilled tokens | preempted | new shapes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for experiment in EXPERIMENTS:
        for name, r in report.get(experiment, {}).items():
            lat = r.get("by_tag", {}).get("stream", r)  # chunking: the running streams' gaps
            lines.append(
                f"| {experiment} | {name} | {r['output_tokens_per_s']:,.1f} "
                f"| {r['requests_per_s']:.2f} | {ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])} "
                f"| {ms(lat['itl_p50_s'])} / {ms(lat['itl_p99_s'])} | {r['max_concurrent']} "
                f"| {r['peak_kv_bytes'] / 2**20:.2f} ({r['pool_kv_bytes'] / 2**20:.2f}) "
                f"| {r['cached_tokens']:,} / {r['prefilled_tokens']:,} | {r['preemptions']} "
                f"| {r['new_shapes_while_measured']} |"
            )
    if "prefix" in report:
        lines.append("")
        for name, r in report["prefix"].items():
            lines.append(
                f"- prefix cache {name}: {r['repeat_prefix_tokens']:,}-token prefix, TTFT cold "
                f"{ms(r['repeat_ttft_cold_s'])} ms, again {ms(r['repeat_ttft_again_s'])} ms "
                f"({r['repeat_cached_tokens']:,} tokens from the cache)"
            )
    if "chunking" in report:
        for name, r in report["chunking"].items():
            lines.append(
                f"- {name} (budget {r['prefill_budget']}): streams' ITL max "
                f"{ms(r['by_tag']['stream']['itl_max_s'])} ms; long prompts' TTFT p50 "
                f"{ms(r['by_tag']['long']['ttft_p50_s'])} ms"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve", description=__doc__.split("\n")[2]
    )
    p.add_argument("--quick", action="store_true", help="a tiny trace of each (a CPU smoke test)")
    p.add_argument("--only", help=f"comma-separated experiments ({','.join(EXPERIMENTS)})")
    p.add_argument(
        "--preset", default=PRESET, help="model preset, random weights (default %(default)s)"
    )
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(EXPERIMENTS)
    if unknown := set(names) - set(EXPERIMENTS):
        p.error(f"unknown experiments: {', '.join(sorted(unknown))}")
    args.only = names
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    compile_cache.enable()  # as the CLIs do; a rerun then skips most compiles
    s = QUICK if args.quick else FULL
    config = preset(args.preset, max_seq_len=s.context)
    model = init(config, seed=SEED)
    report: dict[str, Any] = {
        "meta": {
            "preset": args.preset,
            "config": {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)},
            "scale": dataclasses.asdict(s),
            "quick": args.quick,
            "backend": jax.default_backend(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    for name in args.only:
        report[name] = EXPERIMENTS[name](model, s)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
