"""Continuous batching over a paged KV cache: requests join as blocks allow and leave as they finish.

One `Scheduler` drives one `Engine`. Each `step()`:

- reserves, for every decoding sequence, the blocks its next call writes; when the pool runs
  out it preempts the most recently admitted sequence (its blocks are freed, and it goes back
  to the front of the queue to be recomputed from its prompt and the tokens it has so far), so
  no request fails or mixes under memory pressure;
- plans prefill chunks within a token budget (`Engine.prefill_chunk`): first the prompts
  already being prefilled, then new requests while a slot is free and blocks can be had. A new
  request first takes the cached blocks of its longest known prefix (`infer.blocks`), so a
  repeated system prompt, a chat's earlier turns or the n samples of one prompt are computed
  once. A long prompt is thus spread over several steps, and the decodes keep streaming;
- dispatches the prefill call, then one decode call for every decoding slot, and reads back
  the *previous* calls' tokens, so the host's bookkeeping overlaps the device's next step. A
  request finished by that bookkeeping is one call late to leave its slot; its extra token is
  discarded. Requests with a `response_format` need each token before the next step's mask, so
  while one runs the steps are read back at once.

`submit` and `cancel` may be called from any thread; `step` only from the one driving thread
(`run_until_done` in `generate`, or `serve_forever` in the server).
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from infer.blocks import BlockAllocator
from infer.engine import Chunk, Engine, EngineError, bucket
from infer.grammar import Constraint, allow_all, compile_response_format
from infer.sampling import Sampled, SamplingParams
from infer.speculative import Verified, refusal
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
    accepted token and once more when the request finishes. `cached_tokens` counts the prompt
    tokens served from the prefix cache, `prefilled_tokens` those computed (recomputation after
    a preemption included).
    """

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    max_new_tokens: int
    stream: TextStream
    on_update: Callable[[Request, str], None] | None = None
    constraint: Constraint | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    timings: Timings = field(default_factory=Timings)
    done: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    preemptions: int = 0
    # The sequence as the scheduler runs it: `seq` is what prefill computes (the prompt, or
    # after a preemption the prompt and the tokens so far), `computed` how many tokens of the
    # sequence the dispatched calls have put in `blocks`.
    seq: list[int] = field(default_factory=list, repr=False)
    digests: list[bytes] = field(default_factory=list, repr=False)
    blocks: list[int] = field(default_factory=list, repr=False)
    computed: int = 0
    admitted: int = 0  # admission order: the latest admitted is preempted first

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.seq)

    @property
    def max_total(self) -> int:
        """The most tokens the sequence can reach: its prompt plus its new tokens."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class _Inflight:
    """Device results not yet read, with which request owned each row when dispatched."""

    owners: list[Request | None]
    out: Sampled  # arrays [steps, rows] (decode) or [rows] (prefill first token)
    counts: jax.Array | None = None  # [rows] real tokens of a speculative call's steps


@dataclass
class SchedulerStats:
    """Counters over the scheduler's life (the serving benchmark and metrics read them)."""

    peak_running: int = 0  # most sequences holding a slot at once
    peak_blocks: int = 0  # most blocks held at once
    preemptions: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    draft_proposed: int = 0  # speculative decoding: tokens the draft proposed
    draft_accepted: int = 0  # ... and those the target kept

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens per proposed one (0 before any speculative call)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0


class Scheduler:
    """Feeds an `Engine` from a queue of requests; `prefix_cache` shares full prompt blocks."""

    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Any = None,
        default_stop_ids: Sequence[int] = (),
        max_waiting: int = 1024,
        prefix_cache: bool = True,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.default_stop_ids = frozenset(default_stop_ids)
        self.max_waiting = max_waiting
        self.blocks = BlockAllocator(
            engine.num_blocks, engine.block_size, prefix_cache=prefix_cache
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: list[Request] = []
        self._running: dict[int, Request] = {}  # slot -> request (prefilling or decoding)
        self._inflight: collections.deque[_Inflight] = collections.deque()
        self._admissions = itertools.count()
        self.finished: collections.Counter[str] = collections.Counter()  # by finish reason
        self.stats = SchedulerStats()

    # --- any thread ------------------------------------------------------------------------

    def max_len(self) -> int:
        """The longest sequence (prompt plus new tokens) a request may reach."""
        return self.engine.max_prompt_len() + 1

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a request. Raises `EngineError` for a prompt that does not fit the context,
        stop strings or a response_format without a tokenizer, and `Overloaded` when the queue
        is full."""
        prompt_ids = [int(t) for t in prompt_ids]
        limit = self.engine.max_prompt_len()
        if not 1 <= len(prompt_ids) <= limit:
            raise EngineError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.max_len()} "
                f"tokens, so a prompt may have 1..{limit}"
            )
        try:
            self.engine.config.check_token_ids(prompt_ids, "prompt")
        except ValueError as e:
            raise EngineError(str(e)) from None
        if self.engine.draft is not None and (setting := refusal(params)) is not None:
            raise EngineError(f"{setting} cannot be combined with speculative decoding (--draft)")
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else params.stop_token_ids
        try:
            stream = TextStream(self.tokenizer, params.stop)
            constraint = self._constraint(params, stop_ids)
        except ValueError as e:
            raise EngineError(str(e)) from None
        request = Request(
            prompt_ids=prompt_ids,
            params=params,
            seed=secrets.randbits(32) if params.seed is None else params.seed,
            stop_ids=frozenset(stop_ids),
            max_new_tokens=min(params.max_new_tokens, self.max_len() - len(prompt_ids)),
            stream=stream,
            on_update=on_update,
            constraint=constraint,
            seq=prompt_ids,
        )
        request.timings.submitted = time.perf_counter()
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def _constraint(self, params: SamplingParams, stop_ids) -> Constraint | None:
        if params.response_format is None:
            return None
        if self.tokenizer is None:
            raise ValueError("response_format needs the model's tokenizer")
        grammar = compile_response_format(params.response_format)
        return Constraint(grammar, self.tokenizer, self.engine.config.vocab_size, sorted(stop_ids))

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

    @property
    def running(self) -> int:
        """Sequences holding a decode slot."""
        with self._lock:
            return len(self._running)

    # --- the driving thread ----------------------------------------------------------------

    def step(self) -> bool:
        """Reserve, admit, prefill a budget of chunks, decode once, read back. Returns False
        when idle."""
        self._handle_cancellations()
        self._reserve_decode()
        chunks = self._plan_prefill()
        sync = any(r.constraint is not None for r in self._running.values())
        dispatched = bool(chunks)
        if chunks:
            owners = [r if c.last else None for r, c in chunks]
            masks = self._masks([r for r, _ in chunks]) if sync else None
            first = self.engine.prefill([c for _, c in chunks], masks)
            self._inflight.append(_Inflight(owners, first))
            if sync:
                self._drain()
        active = self.engine.active_slots
        if active:
            dispatched = True
            owners = [self._running.get(s) if s in set(active) else None for s in self._rows]
            self._inflight.append(self._decode(owners, sync))
            steps = 1 if sync else self.engine.tokens_per_call  # at most, speculating
            for slot in active:
                request = self._running[slot]
                request.computed = min(request.computed + steps, request.max_total)
        # A speculative call's token count is known only once read: it is read at once, so
        # the next call's blocks are reserved from the sequence's true length.
        keep = 1 if dispatched and not sync and self.engine.draft is None else 0
        while len(self._inflight) > keep:
            self._read(self._inflight.popleft())
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.blocks.in_use)
        return dispatched or bool(self._inflight)

    def _decode(self, owners: list[Request | None], sync: bool) -> _Inflight:
        """Dispatch the decode call of every decoding slot (speculative with a draft)."""
        if self.engine.draft is not None:
            verified: Verified = self.engine.decode_speculative(self._tables())
            return _Inflight(owners, verified.out, verified.counts)
        masks = self._masks(owners) if sync else None
        return _Inflight(owners, self.engine.decode(self._tables(), masks))

    @property
    def _rows(self) -> range:
        return range(self.engine.slots)

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
        self._inflight.clear()
        for request in [*self._running.values(), *waiting]:
            if not request.done.is_set():
                self._finish(request, "error")
        self._running.clear()
        self.blocks = BlockAllocator(
            self.engine.num_blocks, self.engine.block_size, prefix_cache=self.blocks.prefix_cache
        )
        self.engine.reset()

    def _handle_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
            for request in cancelled:
                if request in self._waiting:
                    self._waiting.remove(request)
        for request in cancelled:
            if not request.done.is_set():
                self._finish(request, "cancelled")

    # --- blocks ----------------------------------------------------------------------------

    def _reserve_decode(self) -> None:
        """Give every decoding sequence the blocks its next call writes, oldest first,
        preempting the latest admitted sequences while the pool is short."""
        steps = self.engine.tokens_per_call
        for request in sorted(self._running.values(), key=lambda r: r.admitted):
            if request.prefilling or request.slot is None:
                continue
            end = min(request.computed + steps, request.max_total)
            while request.slot is not None and not self._grow(request, end):
                self._make_room()

    def _grow(self, request: Request, end: int) -> bool:
        """Make `request`'s blocks cover `end` tokens; False (nothing taken) if short."""
        need = self.blocks.blocks_for(end) - len(request.blocks)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        request.blocks += fresh
        return True

    def _make_room(self) -> None:
        """Free blocks for a sequence that is short of them. First everything in flight is
        read (requests that finish give their blocks back, and the tokens of the rest become
        known); if nothing was in flight, the latest admitted running sequence is preempted:
        its blocks are freed, and it is queued first to be recomputed from its prompt and the
        tokens it has so far."""
        if self._inflight:
            self._drain()
            return
        victim = max(self._running.values(), key=lambda r: r.admitted)
        log.info("KV pool full: preempting a request holding %d blocks", len(victim.blocks))
        self._release(victim)
        victim.seq = victim.prompt_ids + victim.token_ids
        victim.digests, victim.computed = [], 0
        victim.preemptions += 1
        self.stats.preemptions += 1
        with self._lock:
            self._waiting.appendleft(victim)

    def _release(self, request: Request) -> None:
        """Take `request` off its slot and give its blocks back, keeping the full ones whose
        KV is computed in the prefix cache."""
        if request.slot is not None and self._running.get(request.slot) is request:
            del self._running[request.slot]
            self.engine.release(request.slot)
        request.slot = None
        known = (request.prompt_ids + request.token_ids)[: request.computed]
        if request.blocks:
            self.blocks.register(self.blocks.digests(known), request.blocks)
            self.blocks.release(request.blocks)
        request.blocks = []

    # --- prefill planning ------------------------------------------------------------------

    def _plan_prefill(self) -> list[tuple[Request, Chunk]]:
        """This step's prefill chunks, at most `prefill_chunk` tokens in all: the sequences
        already prefilling first, then new admissions while slots and blocks last."""
        budget = self.engine.prefill_chunk
        planned: list[tuple[Request, Chunk]] = []
        for request in sorted(self._running.values(), key=lambda r: r.admitted):
            if budget and request.slot is not None and request.prefilling:
                chunk = self._chunk(request, budget)
                if chunk is None and not planned and not self.engine.active_slots:
                    # Nothing else can progress: make room for the oldest prompt.
                    while chunk is None and len(self._running) > 1:
                        self._make_room()
                        chunk = self._chunk(request, budget)
                if chunk is not None:
                    planned.append((request, chunk))
                    budget -= len(chunk.tokens)
        free = [s for s in self._rows if s not in self._running]
        # Keep a block per decoding sequence for its next step, or admissions would take the
        # blocks the running streams need and be preempted at once.
        decoding = sum(1 for r in self._running.values() if not r.prefilling)
        while budget and free and self.blocks.available > decoding:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting[0]
            if not request.digests:
                request.digests = self.blocks.digests(request.seq)
            request.blocks = self.blocks.match(request.digests, len(request.seq))
            request.computed = len(request.blocks) * self.engine.block_size
            chunk = self._admit(request, free[0], budget)
            if chunk is None:
                self.blocks.release(request.blocks)
                request.blocks, request.computed = [], 0
                break
            with self._lock:
                self._waiting.popleft()
            free.pop(0)
            planned.append((request, chunk))
            budget -= len(chunk.tokens)
        return planned

    def _admit(self, request: Request, slot: int, budget: int) -> Chunk | None:
        request.slot = slot
        chunk = self._chunk(request, budget)
        if chunk is None:
            request.slot = None
            return None
        if not request.preemptions:
            request.cached_tokens = request.computed - len(chunk.tokens)
            self.stats.cached_tokens += request.cached_tokens
        request.admitted = next(self._admissions)
        self._running[slot] = request
        return chunk

    def _chunk(self, request: Request, budget: int) -> Chunk | None:
        """The next chunk of `request`'s prompt (at most `budget` tokens) with the blocks it
        writes taken, or None if not even one token fits. The last chunk also takes the blocks
        of the first decode call, so a finished prompt can always decode."""
        start, remaining = request.computed, len(request.seq) - request.computed
        n = min(remaining, budget)
        steps = self.engine.tokens_per_call
        end = min(start + n + steps, request.max_total) if n == remaining else start + n
        if not self._grow(request, end):
            room = (len(request.blocks) + self.blocks.available) * self.engine.block_size
            n = min(n, room - start, remaining - 1)  # short of the end: not the last chunk
            if n <= 0 or not self._grow(request, start + n):
                return None
        last = n == remaining
        request.computed += n
        request.prefilled_tokens += n
        self.stats.prefilled_tokens += n
        full = request.computed // self.engine.block_size
        self.blocks.register(request.digests[:full], request.blocks[:full])
        return Chunk(
            slot=request.slot,
            tokens=request.seq[start : start + n],
            start=start,
            blocks=list(request.blocks),
            generated_from=len(request.prompt_ids),
            last=last,
            settings=(request.params, request.seed),
        )

    def _tables(self) -> np.ndarray:
        """Every slot's block table for a decode call (empty for free and prefilling slots)."""
        rows = [
            r.blocks if (r := self._running.get(s)) is not None and not r.prefilling else []
            for s in self._rows
        ]
        width = bucket(max(map(len, rows)), 1, self.engine.blocks_per_seq)
        return self.engine.table(rows, width)

    def _masks(self, owners: Sequence[Request | None]) -> np.ndarray:
        """The grammar masks of a call's rows (all tokens allowed for unconstrained rows)."""
        masks = allow_all(len(owners), self.engine.config.vocab_size)
        for row, request in enumerate(owners):
            if request is not None and request.constraint is not None:
                request.constraint.fill_mask(masks[row])
        return masks

    # --- reading results -------------------------------------------------------------------

    def _drain(self) -> None:
        while self._inflight:
            self._read(self._inflight.popleft())

    def _read(self, item: _Inflight) -> None:
        """Host side of one dispatched call: accept each owner's tokens in order."""
        out, counts = jax.device_get((item.out, item.counts))  # one transfer of every array
        tokens, logprobs, top_ids, top_lps = (
            np.asarray(x)[None] if item.out.tokens.ndim == 1 else np.asarray(x) for x in out
        )  # prefill results have no step axis
        for row, request in enumerate(item.owners):
            if request is None or request.done.is_set():
                continue
            steps = tokens.shape[0] if counts is None else int(counts[row])
            if counts is not None:
                self.stats.draft_proposed += tokens.shape[0] - 1
                self.stats.draft_accepted += steps - 1
                # The pools hold the sequence but its newest token (the next call's input),
                # which is what a release registers in the prefix cache.
                request.computed = len(request.prompt_ids) + len(request.token_ids) + steps - 1
            for step in range(steps):
                if request.done.is_set():
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
        if request.constraint is not None and not request.constraint.accept(token):
            log.warning("response_format: token %d refused: %s", token, request.constraint.error)
            return self._finish(request, "error")
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
        self._release(request)
        self.finished[reason] += 1
        request.done.set()
        if request.on_update is not None:
            request.on_update(request, piece)

    def check_idle(self) -> None:
        """Raise unless nothing runs and every block is free or merely cached (tests)."""
        if self._running or self._waiting or self._inflight:
            raise AssertionError("requests are still running")
        self.blocks.check_all_free()


def scheduler_for(
    model: Any,
    *,
    slots: int,
    max_len: int,
    max_waiting: int = 1024,
    prefix_cache: bool = True,
    **engine_options: Any,
) -> Scheduler:
    """An engine over a loaded `Model` (its params, mesh and tokenizer, whose stop tokens end
    generation by default) and the scheduler that feeds it. The CLI, the server and `generate`
    all build theirs here; `engine_options` are `Engine`'s (block_size, num_blocks,
    prefill_chunk, steps_per_call, rules, draft: a `Draft` for speculative decoding)."""
    engine = Engine(
        model.config, model.params, slots=slots, max_len=max_len, mesh=model.mesh, **engine_options
    )
    return Scheduler(
        engine,
        tokenizer=model.tokenizer,
        default_stop_ids=default_stop_ids(model.tokenizer, model.config.vocab_size),
        max_waiting=max_waiting,
        prefix_cache=prefix_cache,
    )
