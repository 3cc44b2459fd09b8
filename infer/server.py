"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health
and /metrics (Prometheus).

One scheduler thread runs continuous batching; request handlers submit to it and await their
tokens through an asyncio queue fed from that thread. Everything a client can get wrong is a
4xx with an OpenAI-style JSON error: invalid JSON or fields (400), a missing or wrong
`--api-key` (401), unknown model (404), a request past `--request-timeout` (408; its
generation is cancelled), a body over `--max-body-bytes` (413), a full queue (429); a server
shutting down answers 503 (`infer.ops`). A streaming client that disconnects has its request
cancelled, which frees its decode slot at the next scheduler step.

`n` choices per prompt are `n` scheduler requests, numbered as OpenAI does: choice i of prompt
j has index j * n + i.

With a guard model (`infer.guard.Screening`), POST /v1/moderations classifies text in OpenAI's
moderation shape, and completions can be screened: the conversation (a /v1/completions prompt
as a user message) before generating (`screen_input`) and each finished reply
(`screen_output`). Code Shield (`infer.code_shield`) scans each finished reply for insecure
code. A blocked choice has finish_reason "content_filter", empty content and in
`content_filter_results` who blocked it (`by`: "guard" or "code_shield") and why; a reply Code
Shield only warns about keeps its text and gains `code_shield: {"issues": [...]}`. A judged
reply is streamed only once it has passed, in one piece at its end. `llama_jax_blocked_total`
counts what was blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from infer.access_log import ResponseEnd
from infer.batching import Overloaded, Request, Scheduler
from infer.code_shield import CodeShieldScanner, ScanResult
from infer.engine import EngineError
from infer.guard import GuardResult, Screening
from infer.metrics import Metrics, TokenTimer
from infer.ops import APIKey, Drain, DrainGate
from infer.protocol import (
    ChatRequest,
    CompletionRequest,
    ModerationRequest,
    SamplingFields,
    TokenText,
    error_body,
    new_id,
    now,
    usage,
)
from infer.sampling import SamplingError, SamplingParams, choice_params
from infer.tools import check_tools, may_be_tool_call, with_tools
from llama_jax.chat import encode_dialog, parse_assistant

log = logging.getLogger("llama_jax.infer.server")


@dataclass(frozen=True)
class Limits:
    """What one request (and the server as a whole) may ask for."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # per request; also bounded by the context
    max_prompts: int = 16  # prompts in one /v1/completions request
    request_timeout: float | None = None  # seconds from arrival; then cancelled with a 408


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, code=self.code)


Event = tuple[int, str, bool, int]  # (choice index, new text, finished, tokens so far)


class Job:
    """The requests of one HTTP call (`n` per prompt, prompt-major) and the queue their
    progress arrives on. Past `timeout` seconds its requests are cancelled and waiting for
    them raises a 408."""

    def __init__(
        self,
        scheduler: Scheduler,
        n: int = 1,
        *,
        timeout: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.scheduler, self.n, self.timeout, self.metrics = scheduler, n, timeout, metrics
        self.requests: list[Request] = []
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else self._loop.time() + timeout

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """One request per (prompt, choice); without a seed each gets a random one (the
        scheduler's default)."""
        choices = choice_params(params, self.n)
        try:
            for ids in prompts:
                for choice in choices:
                    listener = self._listener(len(self.requests))
                    self.requests.append(self.scheduler.submit(ids, choice, listener))
        except Overloaded as e:
            self.cancel()
            raise APIError(429, f"server busy: {e}", "rate_limit_error") from None
        except (EngineError, ValueError) as e:
            self.cancel()
            raise APIError(400, str(e)) from None

    def _listener(self, index: int) -> Callable[[Request, str], None]:
        timer = TokenTimer(self.metrics) if self.metrics is not None else None

        def on_update(request: Request, piece: str) -> None:
            if timer is not None:
                timer(request)
            event = (index, piece, request.done.is_set(), len(request.token_ids))
            with contextlib.suppress(RuntimeError):  # the event loop has shut down
                self._loop.call_soon_threadsafe(self.queue.put_nowait, event)

        return on_update

    async def events(self, http: HTTPRequest | None = None) -> AsyncIterator[Event]:
        """Progress events until every request is done. With `http`, a client that went away
        (checked while waiting) cancels the job."""
        remaining = len(self.requests)
        while remaining:
            self._check_deadline()
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=self._poll_s())
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    self.cancel()
                    return
                continue
            remaining -= event[2]
            yield event

    def _poll_s(self) -> float:
        """How long to wait for an event before looking at the client and the deadline."""
        if self._deadline is None:
            return 1.0
        return min(1.0, max(self._deadline - self._loop.time(), 0.0))

    def _check_deadline(self) -> None:
        if self._deadline is not None and self._loop.time() >= self._deadline:
            self.cancel()
            message = f"request timed out after {self.timeout:g}s"
            raise APIError(408, message, "invalid_request_error", "request_timeout")

    async def wait(self, http: HTTPRequest) -> None:
        """Until every request is done (non-streaming); a failed generation is a 500."""
        async for _ in self.events(http):
            pass
        if any(r.finish_reason == "error" for r in self.requests):
            raise APIError(500, "generation failed; see the server log", "server_error")

    def usage(self) -> dict[str, int]:
        """OpenAI usage; also what the access log shows (it knows nothing of `n`)."""
        return usage(self.requests, self.n)

    def cancel(self) -> None:
        for r in self.requests:
            if not r.done.is_set():
                self.scheduler.cancel(r)


class API:
    """Request handling, independent of the FastAPI wiring in `create_app`."""

    def __init__(
        self,
        scheduler: Scheduler,
        model_name: str,
        limits: Limits,
        metrics: Metrics,
        screening: Screening | None = None,
        code_shield: CodeShieldScanner | None = None,
    ) -> None:
        self.scheduler, self.model_name, self.limits = scheduler, model_name, limits
        self.metrics, self.screening, self.code_shield = metrics, screening, code_shield
        self.tokenizer = scheduler.tokenizer
        self.tokens = TokenText(self.tokenizer)
        self.context = scheduler.engine.max_len
        self.vocab_size = scheduler.engine.config.vocab_size

    def _job(self, n: int) -> Job:
        return Job(self.scheduler, n, timeout=self.limits.request_timeout, metrics=self.metrics)

    def _check(self, body: SamplingFields, max_tokens: int | None, default: int) -> int:
        if body.model not in (None, self.model_name):
            raise APIError(404, f"model {body.model!r} not found; this server has {self.model_name!r}", "not_found_error")  # fmt: skip
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens must be <= {self.limits.max_tokens}, got {max_tokens}")
        return max_tokens or min(default, self.limits.max_tokens)

    def _sampling(
        self, body: SamplingFields, max_new: int, logprobs: bool, top: int
    ) -> SamplingParams:
        try:
            params = body.sampling(max_new, logprobs, top)
            params.check_vocab(self.vocab_size)
            return params
        except SamplingError as e:
            raise APIError(400, str(e)) from None

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and this model has none; send token ids")
        return self.tokenizer

    # --- /v1/completions -------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, http: HTTPRequest):
        max_new = self._check(body, body.max_tokens, 16)
        raw = self._prompt_list(body.prompt)
        prompts = [
            self._need_tokenizer("a text prompt").encode(p, bos=True) if isinstance(p, str) else p
            for p in raw
        ]
        want_lp = body.logprobs is not None
        params = self._sampling(body, max_new, want_lp, body.logprobs or 0)
        n = body.n or 1
        job = http.state.job = self._job(n)  # the access log reads its usage
        # The guard judges a prompt as a user message and its completion as the reply.
        asks = [[{"role": "user", "content": self._prompt_text(p)}] if self.screening else []
                for p in raw]  # fmt: skip
        inputs = await self._screen_inputs(asks, http)
        job.submit([p for p, b in zip(prompts, inputs, strict=True) if b is None], params)
        # The choice index of each job request: prompt j has choices j * n .. j * n + n - 1.
        order = [j * n + i for j, b in enumerate(inputs) if b is None for i in range(n)]
        rid, created = new_id("cmpl"), now()

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_name, "choices": choices, **extra}  # fmt: skip

        def refused(j: int) -> list[dict]:
            """The choices of prompt j, blocked before generating."""
            return [{"index": j * n + i, "text": "", "logprobs": None, **inputs[j]}
                    for i in range(n)]  # fmt: skip

        def finished(k: int, extra: dict) -> dict:
            """The choice of job request k with what judging its reply added (`extra`)."""
            if blocks(extra):
                return {"index": order[k], "text": "", "logprobs": None, **extra}
            r = job.requests[k]
            lp = self.tokens.completion_logprobs(r, 0, len(r.token_ids), 0) if want_lp else None
            return {"index": order[k], "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": lp, **extra}  # fmt: skip

        async def judged(ks: list[int]) -> list[dict]:
            turns = [[*asks[order[k] // n], {"role": "assistant", "content": job.requests[k].text}]
                     for k in ks]  # fmt: skip
            return await self._judge_replies(turns, http)

        if not body.stream:
            await job.wait(http)
            ks = list(range(len(job.requests)))
            choices = [c for j, b in enumerate(inputs) if b is not None for c in refused(j)]
            choices += [finished(k, extra) for k, extra in zip(ks, await judged(ks), strict=True)]
            return chunk(sorted(choices, key=lambda c: c["index"]), usage=job.usage())

        hold = self._judges_replies()

        async def stream() -> AsyncIterator[dict]:
            for j, b in enumerate(inputs):
                if b is not None:
                    yield chunk(refused(j))
            sent = [0] * len(job.requests)
            offsets = [0] * len(job.requests)
            async for k, piece, done, count in job.events():
                if hold:  # a reply to be judged is sent in one piece once it has passed
                    if done:
                        [extra] = await judged([k])
                        yield chunk([finished(k, extra)])
                    continue
                r = job.requests[k]
                lp = None
                if want_lp:
                    lp = self.tokens.completion_logprobs(r, sent[k], count, offsets[k])
                    offsets[k] += sum(len(t) for t in lp["tokens"])
                sent[k] = count
                if piece or done or lp:
                    yield chunk([{"index": order[k], "text": piece, "logprobs": lp,
                                  "finish_reason": r.finish_reason if done else None}])  # fmt: skip
            if body.include_usage:
                yield chunk([], usage=job.usage())

        return sse(stream(), job)

    def _prompt_list(self, prompt: Any) -> list[str | list[int]]:
        """The prompts of a /v1/completions request: texts or token-id lists."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty")
        if len(prompt) > self.limits.max_prompts:
            raise APIError(400, f"at most {self.limits.max_prompts} prompts per request")
        return prompt

    def _prompt_text(self, prompt: str | list[int]) -> str:
        """A prompt as the guard reads it: token ids decoded, without the BOS token."""
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "the guard reads prompt text, and this model has no tokenizer to decode token ids")  # fmt: skip
        bos = getattr(self.tokenizer, "bos_id", None)
        return self.tokenizer.decode(prompt[1:] if prompt[:1] == [bos] else prompt)

    # --- /v1/chat/completions --------------------------------------------------------------

    async def chat(self, body: ChatRequest, http: HTTPRequest):
        tok = self._need_tokenizer("chat")
        tools = []
        try:
            if body.tools and body.tool_choice != "none":
                tools = check_tools(body.tools)
            ids = encode_dialog(tok, with_tools(body.messages, tools))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise APIError(400, f"messages: {e}") from None
        room = max(self.context - len(ids), 1)
        max_new = self._check(body, body.max_completion_tokens or body.max_tokens, room)
        want_lp = bool(body.logprobs)
        params = self._sampling(body, max_new, want_lp, body.top_logprobs or 0 if want_lp else 0)
        n = body.n or 1
        job = http.state.job = self._job(n)
        [blocked] = await self._screen_inputs([body.messages], http)
        if blocked is None:
            job.submit([ids], params)
        hold = self._judges_replies()
        rid, created = new_id("chatcmpl"), now()

        def reply(r: Request) -> tuple[dict, str]:
            """The finished message and finish_reason (tool calls parsed when tools were on)."""
            message = parse_assistant(tok, r.token_ids) if tools else None
            if message and message["tool_calls"]:
                return {"role": "assistant", "content": None,
                        "tool_calls": message["tool_calls"]}, "tool_calls"  # fmt: skip
            return {"role": "assistant", "content": r.text}, r.finish_reason

        def chunk(
            index: int,
            delta: dict,
            finish: str | None = None,
            lp: dict | None = None,
            extra: dict | None = None,
        ) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            choice.update(extra or {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name, "choices": [choice]}  # fmt: skip

        async def judged(requests: list[Request]) -> list[dict]:
            turns = [[*body.messages, {"role": "assistant", "content": r.text}] for r in requests]
            return await self._judge_replies(turns, http)

        if not body.stream:
            await job.wait(http)
            extras = [blocked] * n if blocked is not None else await judged(job.requests)
            choices = []
            for i, extra in enumerate(extras):
                if blocks(extra):
                    choices.append({"index": i, "message": {"role": "assistant", "content": ""},
                                    "logprobs": None, **extra})  # fmt: skip
                    continue
                r = job.requests[i]
                message, finish = reply(r)
                lp = self.tokens.chat_logprobs(r, 0, len(r.token_ids)) if want_lp else None
                choices.append({"index": i, "message": message, "logprobs": lp,
                                "finish_reason": finish, **extra})  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": self.model_name, "choices": choices,
                    "usage": job.usage()}  # fmt: skip

        async def stream() -> AsyncIterator[dict]:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            if blocked is not None:
                for i in range(n):
                    yield chunk(i, {}, "content_filter", extra=blocked)
            held, sent = [""] * n, [0] * n
            streaming = [not tools and not hold] * n
            async for i, piece, done, count in job.events():
                r = job.requests[i]
                held[i] += piece
                # With tools on offer, text that may still become a tool call waits; a reply
                # to be judged waits for its verdict.
                streaming[i] = not hold and (streaming[i] or not may_be_tool_call(held[i]))
                if streaming[i] and (held[i] or count > sent[i]):
                    lp = self.tokens.chat_logprobs(r, sent[i], count) if want_lp else None
                    yield chunk(i, {"content": held[i]}, lp=lp)
                    held[i], sent[i] = "", count
                if done:
                    [extra] = await judged([r])
                    if blocks(extra):
                        yield chunk(i, {}, "content_filter", extra=extra)
                        continue
                    message, finish = reply(r)
                    if message.get("tool_calls"):
                        calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                        yield chunk(i, {"tool_calls": calls})
                    elif held[i]:
                        yield chunk(i, {"content": held[i]})
                    yield chunk(i, {}, finish, extra=extra)
            if body.include_usage:
                yield {**chunk(0, {}), "choices": [], "usage": job.usage()}

        return sse(stream(), job)

    # --- the guard model and Code Shield -----------------------------------------------------

    def _judges_replies(self) -> bool:
        """Whether finished replies are judged (and so sent only once they have passed)."""
        guard_output = self.screening is not None and self.screening.screen_output
        return guard_output or self.code_shield is not None

    async def _screen_inputs(
        self, conversations: list[list[dict]], http: HTTPRequest
    ) -> list[dict | None]:
        """Per conversation, the fields of its blocked choices when the guard flags it before
        generating (`screen_input`), else None."""
        screen = self.screening
        if screen is None or not screen.screen_input:
            return [None] * len(conversations)
        verdicts = await self._screen(conversations, http)
        if flagged := sum(v.flagged for v in verdicts):
            self.metrics.blocked.labels("guard", "input").inc(flagged)
        return [filtered(v) if v.flagged else None for v in verdicts]

    async def _judge_replies(self, turns: list[list[dict]], http: HTTPRequest) -> list[dict]:
        """What each finished reply adds to its choice (`turns`: each conversation ending in
        its reply): a blocked choice's fields when the guard (`screen_output`) or Code Shield
        blocks it, Code Shield's issues when it only warns, else nothing."""
        extras: list[dict] = [{} for _ in turns]
        screen = self.screening
        if screen is not None and screen.screen_output:
            for k, verdict in enumerate(await self._screen(turns, http)):
                if verdict.flagged:
                    extras[k] = filtered(verdict)
        if self.code_shield is not None:
            pending = [k for k, extra in enumerate(extras) if not extra]
            scans = await asyncio.gather(
                *(self.code_shield.scan(turns[k][-1]["content"]) for k in pending)
            )
            for k, scan in zip(pending, scans, strict=True):
                extras[k] = shielded(scan)
        for extra in filter(blocks, extras):
            self.metrics.blocked.labels(extra["content_filter_results"]["by"], "output").inc()
        return extras

    async def _screen(
        self, conversations: list[list[dict]], http: HTTPRequest
    ) -> list[GuardResult]:
        """The guard's verdict on the last message of each conversation, in one batch."""
        screen = self.screening
        assert screen is not None
        try:
            prompts = [screen.guard.prompt_ids(c, screen.excluded) for c in conversations]
        except ValueError as e:
            raise APIError(400, f"guard: {e}") from None
        job = Job(screen.guard.scheduler, timeout=self.limits.request_timeout)
        job.submit(prompts, screen.guard.params)
        await job.wait(http)
        return [screen.guard.result(r, screen.excluded, screen.threshold) for r in job.requests]

    async def moderations(self, body: ModerationRequest, http: HTTPRequest) -> dict:
        """OpenAI's moderation API: one result per input text, judged as a user message.
        Categories are keyed by their Llama Guard names; a flagged input scores P(unsafe) in
        each category the guard named, every other score is 0."""
        screen = self.screening
        if screen is None:
            raise APIError(404, "this server has no guard model: start it with --guard CHECKPOINT", "not_found_error")  # fmt: skip
        if body.model not in (None, screen.model_name):
            raise APIError(404, f"model {body.model!r} not found; the guard is {screen.model_name!r}", "not_found_error")  # fmt: skip
        texts = [body.input] if isinstance(body.input, str) else body.input
        most = self.limits.max_prompts
        if not isinstance(texts, list) or not 1 <= len(texts) <= most or not all(isinstance(t, str) for t in texts):  # fmt: skip
            raise APIError(400, f"input must be a string or a list of 1 to {most} strings")
        verdicts = await self._screen([[{"role": "user", "content": t}] for t in texts], http)
        names = screen.names()
        results = []
        for v in verdicts:
            hit = {code for code in v.categories if v.flagged}
            results.append({
                "flagged": v.flagged,
                "categories": {name: code in hit for code, name in names.items()},
                "category_scores": {name: v.p_unsafe if code in hit else 0.0
                                    for code, name in names.items()},
            })  # fmt: skip
        return {"id": new_id("modr"), "model": screen.model_name, "results": results}


def filtered(verdict: GuardResult) -> dict[str, Any]:
    """The fields of a choice the guard blocked."""
    results = {"flagged": True, "by": "guard", "categories": list(verdict.categories),
               "p_unsafe": verdict.p_unsafe}  # fmt: skip
    return {"finish_reason": "content_filter", "content_filter_results": results}


def shielded(scan: ScanResult) -> dict[str, Any]:
    """The fields Code Shield adds to a choice: a blocked one's, or the issues it warns about
    (nothing for a reply without issues)."""
    issues = list(scan.issues)
    if scan.blocked:
        results = {"flagged": True, "by": "code_shield", "issues": issues}
        return {"finish_reason": "content_filter", "content_filter_results": results}
    return {"code_shield": {"issues": issues}} if issues else {}


def blocks(extra: dict[str, Any] | None) -> bool:
    """Whether a choice's added fields (`filtered`, `shielded`) block it."""
    return bool(extra) and extra.get("finish_reason") == "content_filter"


def sse(chunks: AsyncIterator[dict], job: Job) -> StreamingResponse:
    """Server-sent events ending in `[DONE]`; a disconnect (the stream is cancelled) cancels
    the job's requests, freeing their slots. An error once the stream has begun (a timeout)
    is an OpenAI error event before the `[DONE]`, the status being sent already."""

    async def body() -> AsyncIterator[str]:
        try:
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


class BodyLimit:
    """ASGI middleware bounding request bodies: a declared Content-Length over the limit gets a
    JSON 413 before anything is read; a body streamed without one is cut off at the limit (the
    HTTPException raised while the route reads it becomes the same JSON 413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body must be at most {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            response = JSONResponse(error_body(message, "invalid_request_error"), 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


def create_app(
    scheduler: Scheduler,
    *,
    model_name: str,
    limits: Limits = Limits(),
    api_key: str | None = None,
    screening: Screening | None = None,
    code_shield: CodeShieldScanner | None = None,
) -> FastAPI:
    """The FastAPI app; the scheduler thread (and the guard's, with `screening`) runs for the
    app's lifetime. With `api_key`, the `/v1/` routes need it as a bearer token; with
    `code_shield`, every finished reply is scanned.
    `app.state.drain` refuses new requests and waits for those in flight when the server
    shuts down (`Drain.run`)."""
    metrics = Metrics(scheduler)
    api = API(scheduler, model_name, limits, metrics, screening, code_shield)
    drain = Drain()
    stop = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        served = {"scheduler": scheduler}
        if screening is not None:
            served["guard"] = screening.guard.scheduler
        threads = [
            threading.Thread(target=s.serve_forever, args=(stop,), name=name, daemon=True)
            for name, s in served.items()
        ]
        for thread in threads:
            thread.start()
        yield
        stop.set()
        for thread in threads:
            thread.join(timeout=10)

    app = FastAPI(title="llama-jax", lifespan=lifespan)
    app.state.drain = drain
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # the innermost
    if api_key:
        app.add_middleware(APIKey, key=api_key)
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(ResponseEnd, ended=metrics.request_ended)  # counts every answer

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        else:
            where = ".".join(str(x) for x in first.get("loc", ())[1:])
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_req, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    @app.get("/health")
    async def health():
        if drain.draining:  # load balancers stop sending here
            return JSONResponse({"status": "draining", "model": model_name}, 503)
        return {
            "status": "ok",
            "model": model_name,
            "load": scheduler.load,
            "finished": dict(scheduler.finished),
        }

    @app.get("/metrics")
    async def prometheus():
        return metrics.response()

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "llama-jax"}
        return {"object": "list", "data": [card]}

    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/moderations")(api.moderations)
    return app
