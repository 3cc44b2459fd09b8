"""Continuous batching: requests join free decode slots as they arrive and leave as they finish.

One `Scheduler` drives one `Engine`. Each `step()` admits waiting requests into free slots (one
batched, chunked prefill at a time, interleaved chunk by chunk with decoding so running
requests keep streaming), dispatches one decode call, and then reads back the *previous*
call's tokens, so the host's bookkeeping overlaps the device's next step. A request finished
by that bookkeeping is one call late to leave its slot; its extra token is discarded.

`submit` and `cancel` may be called from any thread; `step` only from the one driving thread
(`run_until_done` in `generate`, or `serve_forever` in the server).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from infer.engine import Engine, EngineError, Prefill
from infer.sampling import Sampled, SamplingParams
from infer.text import TextStream
from llama_jax.tokenizer import default_stop_ids

log = logging.getLogger("llama_jax.infer")


class Overloaded(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class Timings:
    """Wall-clock marks of one request (seconds, `time.perf_counter`)."""

    submitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0

    def as_dict(self, n_generated: int) -> dict[str, float]:
        ttft = self.first_token - self.submitted
        decode = self.finished - self.first_token
        return {
            "time_to_first_token_s": round(ttft, 6),
            "decode_s": round(decode, 6),
            "total_s": round(self.finished - self.submitted, 6),
            "decode_tokens_per_s": round((n_generated - 1) / decode, 3) if decode > 0 else 0.0,
        }


@dataclass(eq=False)
class Request:
    """One generation. Read `token_ids`, `text`, `finish_reason` once `done` is set.

    `on_update(request, new_text)` (optional) is called on the scheduler thread after every
    accepted token and once more when the request finishes.
    """

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    max_new_tokens: int
    stream: TextStream
    on_update: Callable[[Request, str], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    timings: Timings = field(default_factory=Timings)
    done: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None

    @property
    def text(self) -> str:
        return self.stream.text


@dataclass
class _Inflight:
    """Device results not yet read, with which request owned each row when dispatched."""

    owners: list[Request | None]
    out: Sampled  # arrays [steps, rows] (decode) or [rows] (prefill first token)


class Scheduler:
    """Feeds an `Engine` from a queue of requests."""

    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Any = None,
        default_stop_ids: Sequence[int] = (),
        max_waiting: int = 1024,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.default_stop_ids = frozenset(default_stop_ids)
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: list[Request] = []
        self._running: dict[int, Request] = {}  # slot -> request (prefilling or decoding)
        self._prefill: Prefill | None = None
        self._prefill_reqs: list[Request] = []
        self._inflight: collections.deque[_Inflight] = collections.deque()
        self.finished: collections.Counter[str] = collections.Counter()  # by finish reason

    # --- any thread ------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a request. Raises `EngineError` for a prompt that does not fit the context or
        stop strings without a tokenizer, and `Overloaded` when the queue is full."""
        prompt_ids = [int(t) for t in prompt_ids]
        limit = self.engine.max_prompt_len()
        if not 1 <= len(prompt_ids) <= limit:
            raise EngineError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.engine.max_len} "
                f"tokens, so a prompt may have 1..{limit}"
            )
        try:
            self.engine.config.check_token_ids(prompt_ids, "prompt")
        except ValueError as e:
            raise EngineError(str(e)) from None
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else params.stop_token_ids
        try:
            stream = TextStream(self.tokenizer, params.stop)
        except ValueError as e:
            raise EngineError(str(e)) from None
        request = Request(
            prompt_ids=prompt_ids,
            params=params,
            seed=secrets.randbits(32) if params.seed is None else params.seed,
            stop_ids=frozenset(stop_ids),
            max_new_tokens=min(params.max_new_tokens, self.engine.max_len - len(prompt_ids)),
            stream=stream,
            on_update=on_update,
        )
        request.timings.submitted = time.perf_counter()
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` (e.g. its client went away) and free its slot."""
        with self._wake:
            self._cancelled.append(request)
            self._wake.notify()

    @property
    def load(self) -> int:
        """Requests waiting or running."""
        with self._lock:
            return len(self._waiting) + len(self._running)

    # --- the driving thread ----------------------------------------------------------------

    def step(self) -> bool:
        """Admit, prefill a chunk, decode once, read back. Returns False when idle."""
        self._handle_cancellations()
        self._admit()
        dispatched = False
        if self._prefill is not None:
            dispatched = True
            if self.engine.advance(self._prefill):
                owners = [None] * len(self._prefill.slots)
                owners[: len(self._prefill_reqs)] = self._prefill_reqs
                self._inflight.append(_Inflight(owners, self._prefill.first))
                self._prefill, self._prefill_reqs = None, []
        if self.engine.active_slots:
            dispatched = True
            active = set(self.engine.active_slots)
            owners = [
                self._running.get(s) if s in active else None for s in range(self.engine.slots)
            ]
            self._inflight.append(_Inflight(owners, self.engine.decode()))
        keep = 1 if dispatched else 0
        while len(self._inflight) > keep:
            self._read(self._inflight.popleft())
        return dispatched or bool(self._inflight)

    def run_until_done(self, requests: Sequence[Request]) -> None:
        while not all(r.done.is_set() for r in requests):
            self.step()

    def serve_forever(self, stop: threading.Event) -> None:
        """Step while there is work; sleep until `submit`/`cancel` when idle. A failing step
        (a bug, device OOM) fails the requests in flight, not the server."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception:
                log.exception("scheduler step failed; failing all requests in flight")
                self._abort_all()
                busy = False
            if not busy:
                with self._wake:
                    if not (self._waiting or self._cancelled or stop.is_set()):
                        self._wake.wait(timeout=0.5)

    def _abort_all(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in [*self._running.values(), *waiting]:
            if not request.done.is_set():
                self._finish(request, "error")
        self._running.clear()
        self._prefill, self._prefill_reqs = None, []
        self._inflight.clear()
        self.engine.reset()

    def _handle_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
            for request in cancelled:
                if request in self._waiting:
                    self._waiting.remove(request)
        for request in cancelled:
            if not request.done.is_set() and request not in self._prefill_reqs:
                self._finish(request, "cancelled")
            elif not request.done.is_set():
                # Mid-prefill: finish once its slot is committed (reading the first token).
                request.finish_reason = "cancelled"

    def _admit(self) -> None:
        if self._prefill is not None:
            return
        free = [s for s in range(self.engine.slots) if s not in self._running]
        with self._lock:
            batch = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        if not batch:
            return
        for slot, request in zip(free, batch, strict=False):
            request.slot = slot
            self._running[slot] = request
        self._prefill_reqs = batch
        self._prefill = self.engine.start_prefill(
            [r.slot for r in batch],
            [r.prompt_ids for r in batch],
            [(r.params, r.seed) for r in batch],
        )

    def _read(self, item: _Inflight) -> None:
        """Host side of one dispatched call: accept each owner's tokens in order."""
        out = jax.device_get(item.out)  # one transfer of every array
        tokens, logprobs, top_ids, top_lps = (
            np.asarray(x)[None] if item.out.tokens.ndim == 1 else np.asarray(x) for x in out
        )  # prefill results have no step axis
        for row, request in enumerate(item.owners):
            for step in range(tokens.shape[0]):
                if request is None or request.done.is_set():
                    break
                if request.finish_reason == "cancelled":
                    self._finish(request, "cancelled")
                    break
                alternatives = zip(top_ids[step, row], top_lps[step, row], strict=True)
                self._accept(request, int(tokens[step, row]), logprobs[step, row], alternatives)

    def _accept(self, request: Request, token: int, logprob, alternatives) -> None:
        if not request.token_ids:
            request.timings.first_token = time.perf_counter()
        request.token_ids.append(token)
        if request.params.logprobs or request.params.top_logprobs:
            request.logprobs.append(float(logprob))
            top = [(int(t), float(lp)) for t, lp in alternatives]
            request.top_logprobs.append(top[: request.params.top_logprobs])
        if token in request.stop_ids:
            return self._finish(request, "stop")
        piece = request.stream.add(token)
        if request.stream.stopped:
            return self._finish(request, "stop", piece)
        if len(request.token_ids) >= request.max_new_tokens:
            return self._finish(request, "length", piece)
        if request.on_update is not None:
            request.on_update(request, piece)

    def _finish(self, request: Request, reason: str, piece: str = "") -> None:
        piece += request.stream.finish()
        request.finish_reason = reason
        request.timings.finished = time.perf_counter()
        if not request.timings.first_token:
            request.timings.first_token = request.timings.finished
        if request.slot is not None and self._running.get(request.slot) is request:
            del self._running[request.slot]
            self.engine.release(request.slot)
        self.finished[reason] += 1
        request.done.set()
        if request.on_update is not None:
            request.on_update(request, piece)


def scheduler_for(
    model: Any, *, slots: int, max_len: int, max_waiting: int = 1024, **engine_options: Any
) -> Scheduler:
    """An engine over a loaded `Model` (its params, mesh and tokenizer, whose stop tokens end
    generation by default) and the scheduler that feeds it. The CLI, the server and `generate`
    all build theirs here; `engine_options` are `Engine`'s (prefill_chunk, steps_per_call,
    rules)."""
    engine = Engine(
        model.config, model.params, slots=slots, max_len=max_len, mesh=model.mesh, **engine_options
    )
    return Scheduler(
        engine,
        tokenizer=model.tokenizer,
        default_stop_ids=default_stop_ids(model.tokenizer, model.config.vocab_size),
        max_waiting=max_waiting,
    )
