"""Multi-host serving: one scheduler on process 0, the same engine calls on every process.

A model too big for one host's chips runs SPMD over a global mesh (`sharding.distributed`):
every jitted prefill and decode step is one program across all processes, so every process
must issue the same calls with the same host arguments in the same order. Process 0 runs the
HTTP front end and the scheduler over a `LockstepEngine`, which sends each call (method name
and host arguments: chunks, block tables, masks; the sampling settings travel in the chunks)
to the other processes before running it; they `follow`, running each call on their own
`Engine` built with the same settings. Each step's sampled tokens are then gathered onto every
device (one more collective that all processes run), since with the slots split over the
mesh some rows live only on other processes' devices and process 0 must read them all.

The calls travel through the key-value store of JAX's distributed service, not a device
collective (`multihost_utils.broadcast_one_to_all`): a store read takes a timeout, so an idle
process waits for process 0 without tying up the devices and a dead process 0 shows up as an error, whereas a
collective has no timeout, a size that must be agreed before each payload, and one compile per
payload size. The store holds one key per call, deleted `WINDOW` calls later.

Liveness: every process bumps a heartbeat key once a `beat` and watches the others' (process 0
watches all, the rest watch process 0). One silent for `timeout` seconds, or a store that
stops answering (it lives in process 0), ends the process with one line on stderr, e.g.
`llama_jax serve: process 1 stopped responding; shutting down`, and exit status 1, so a lost
process takes the job down instead of leaving the others blocked in a collective forever.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from infer.engine import Chunk, Engine
from infer.sampling import Sampled
from sharding import distributed

log = logging.getLogger("llama_jax.infer")

PREFIX = "llama_jax/lockstep"
WINDOW = 1024  # calls a process may lag behind process 0 before its key is deleted (it lags by ~3)
POLL_MS = 1000  # how often a waiting process wakes to see whether it should still wait

Call = tuple[str, tuple[Any, ...]]


def _exit(line: str) -> None:
    """Print `line` and end the process now: other threads may be blocked in a collective
    that will never complete, and the distributed service's exit barrier would wait for the
    lost process too."""
    print(f"llama_jax serve: {line}; shutting down", file=sys.stderr, flush=True)
    os._exit(1)


class Group:
    """This process's place in a serving job: the store, the call counter and the liveness
    watch. `start` after `sharding.distributed.initialize`; `stop` ends the watch (process 0
    first tells the other processes to stop)."""

    def __init__(self, *, timeout: float = 30.0, beat: float = 1.0) -> None:
        from jax._src.distributed import global_state  # the store has no public handle

        self.client = global_state.client
        if self.client is None:
            raise RuntimeError("multi-host serving needs jax.distributed.initialize() first")
        self.rank, self.size = jax.process_index(), jax.process_count()
        self.timeout, self.beat = timeout, beat
        self._calls = 0
        self._lock = threading.Lock()  # the scheduler thread and shutdown both send
        self._stopped = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, name="lockstep-watch", daemon=True)
        # The watched processes (process 0 watches all, the rest watch process 0): each one's
        # last heartbeat value and when it last changed.
        watched = range(1, self.size) if self.serving else [0]
        self._seen: dict[int, tuple[str | None, float]] = {
            p: (None, time.monotonic()) for p in watched
        }

    @property
    def serving(self) -> bool:
        """Process 0: it runs the HTTP front end and the scheduler."""
        return self.rank == 0

    def start(self) -> Group:
        """Start the liveness watch, have failed steps checked against it (see
        `LostProcessFirst`) before they are logged, and make a process that leaves on its own
        (an error while loading, say) leave at once (see `_leave`)."""
        self._watch.start()
        log.addFilter(LostProcessFirst(self))
        atexit.register(self._leave)
        return self

    def _leave(self) -> None:
        """At exit without process 0's stop call: end the process now, status 1, its error line
        already printed. JAX's own exit handler would wait for the other processes at the
        distributed service's shutdown barrier (minutes), beating all the while, so they would
        not see this one go; and a barrier that times out aborts every process with a stack
        trace. Registered after JAX's handler, so it runs first."""
        if not self._stopped.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    # --- calls -----------------------------------------------------------------------------

    def send(self, calls: Sequence[Call]) -> None:
        """Process 0: publish the next batch of calls for every other process."""
        with self._lock:
            self._calls += 1
            self.client.key_value_set_bytes(f"{PREFIX}/{self._calls}", pickle.dumps(list(calls)))
            if self._calls > WINDOW:
                self.client.key_value_delete(f"{PREFIX}/{self._calls - WINDOW}")

    def receive(self) -> list[Call]:
        """Processes but 0: the next batch of calls, waiting as long as process 0 is alive."""
        self._calls += 1
        key = f"{PREFIX}/{self._calls}"
        while True:
            try:
                return pickle.loads(self.client.blocking_key_value_get_bytes(key, POLL_MS))
            except Exception as e:  # the store raises one error type; only its text differs
                if "DEADLINE_EXCEEDED" not in str(e):
                    _exit("process 0 stopped responding")

    def stop(self) -> None:
        """End the liveness watch; process 0 first sends the other processes their last call."""
        if self.serving and not self._stopped.is_set():
            with contextlib.suppress(Exception):
                self.send([("stop", ())])
        self._stopped.set()

    # --- liveness --------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        beats = 0
        while not self._stopped.wait(self.beat):
            beats += 1
            try:
                self.client.key_value_set(f"{PREFIX}/beat/{self.rank}", str(beats), True)
                values = {p: self._try_get(f"{PREFIX}/beat/{p}") for p in self._seen}
            except Exception:
                if self._stopped.is_set():
                    return
                _exit("process 0 stopped responding" if not self.serving else "store failed")
            now = time.monotonic()
            for p, value in values.items():
                if value != self._seen[p][0]:
                    self._seen[p] = (value, now)
                elif now - self._seen[p][1] > self.timeout and not self._stopped.is_set():
                    _exit(f"process {p} stopped responding")

    def confirm_alive(self) -> None:
        """Return once every watched process is seen to beat after this call. One that does
        not within the timeout is lost, and the watch ends this process meanwhile.

        A beat read now may have been written a beat or two ago (the two sides tick apart), so
        only the third beat past the one last seen is proof of life since."""
        since = time.monotonic()
        start = {p: _count(value) for p, (value, _) in self._seen.items()}
        deadline = since + self.timeout + 2 * self.beat
        while time.monotonic() < deadline and not self._stopped.is_set():
            if all(_count(self._seen[p][0]) >= start[p] + 3 for p in start):
                return
            time.sleep(self.beat / 4)

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" in str(e):
                return None
            raise


class LostProcessFirst(logging.Filter):
    """Holds back a logged failure (a record with a traceback) until every watched process is
    known to be alive. A step of a multi-host job usually fails because a process was lost
    (its collectives break off); then the job ends with the watch's one line instead of a
    traceback. A failure of the step itself is logged as before, three beats later."""

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.group = group

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.group.confirm_alive()
        return True


def _count(beat: str | None) -> int:
    return 0 if beat is None else int(beat)


def _replicate(mesh: jax.sharding.Mesh) -> Callable[[Sampled], Sampled]:
    """Sampled tokens copied to every device, so process 0 can read rows that other
    processes' devices computed. Every process runs it after each step (it is a collective)."""
    return jax.jit(lambda out: out, out_shardings=NamedSharding(mesh, PartitionSpec()))


class LockstepEngine:
    """Process 0's engine: each call is sent to the other processes, then run on `engine` here.

    A wrapper (`scheduler.engine = LockstepEngine(group, scheduler.engine)`) rather than a
    subclass, so the scheduler is built by `infer.batching.scheduler_for` like any other and
    every process constructs its engine (itself an SPMD call) the same way. `release` only
    changes host state that the next device call reads, so releases are queued and sent with
    that call: one store write per step."""

    def __init__(self, group: Group, engine: Engine) -> None:
        self._group, self._engine = group, engine
        self._pending: list[Call] = []
        self._gather = _replicate(engine.mesh)
        group.send([("check", (settings(engine),))])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _send(self, call: Call) -> None:
        calls, self._pending = [*self._pending, call], []
        self._group.send(calls)

    def prefill(self, chunks: Sequence[Chunk], bitmask: np.ndarray | None = None) -> Sampled:
        self._send(("prefill", (list(chunks), bitmask)))
        return self._gather(self._engine.prefill(chunks, bitmask))

    def decode(self, tables: np.ndarray, bitmask: np.ndarray | None = None) -> Sampled:
        self._send(("decode", (tables, bitmask)))
        return self._gather(self._engine.decode(tables, bitmask))

    def release(self, slot: int) -> None:
        self._pending.append(("release", (slot,)))
        self._engine.release(slot)

    def reset(self) -> None:
        self._pending = []  # a reset forgets every slot anyway
        self._send(("reset", ()))
        self._engine.reset()


def settings(engine: Engine) -> tuple:
    """What must agree between process 0's engine and another process's for their calls to be one
    SPMD program (they are built from the same command line; this catches a mismatch)."""
    return (
        engine.config,
        engine.slots,
        engine.max_len,
        engine.block_size,
        engine.num_blocks,
        engine.prefill_chunk,
        engine.steps_per_call,
        engine.rules,
        tuple(engine.mesh.shape.items()),
    )


def follow(group: Group, engine: Engine) -> None:
    """The serving loop of a process but 0: run process 0's calls on `engine` until it says stop.

    An engine call that fails here failed on process 0 too (same program, same arguments),
    whose scheduler then resets the engine and says so; so a failure is logged and the loop
    goes on, as process 0's does."""
    gather = _replicate(engine.mesh)
    while True:
        for name, args in group.receive():
            if name == "stop":
                group.stop()
                return
            if name == "check":
                if args[0] != settings(engine):
                    _exit(f"process {group.rank}: engine settings differ from process 0's")
                continue
            try:
                out = getattr(engine, name)(*args)
                if name in ("prefill", "decode"):
                    gather(out)
            except Exception:
                log.exception("lockstep %s failed on process %d", name, group.rank)


def add_args(p: argparse.ArgumentParser) -> None:
    """The `serve` flags that make this process one of a multi-host job."""
    g = p.add_argument_group("multi-host serving (process 0 serves HTTP, the others follow)")
    g.add_argument("--multihost", action="store_true",
                   help="join a jax.distributed job (coordinator, count and id detected on "
                        "Cloud TPU, SLURM, ...; or given below, which implies --multihost)")  # fmt: skip
    g.add_argument("--coordinator", help="HOST:PORT of process 0's distributed service")
    g.add_argument("--num-processes", type=int, help="processes in the job")
    g.add_argument("--process-id", type=int, help="this process's index (0 serves)")
    g.add_argument("--heartbeat-timeout", type=float, default=60.0,
                   help="seconds a silent process is waited for before the job shuts down "
                        "(default 60)")  # fmt: skip


def join(args: argparse.Namespace) -> Group | None:
    """Join the job the flags of `add_args` describe (None if they describe none). Call before
    anything touches a device; the liveness watch starts here, so a process lost while the
    model loads takes the job down too."""
    given = (args.coordinator, args.num_processes, args.process_id)
    if not args.multihost and all(x is None for x in given):
        return None
    distributed.initialize(*given)
    return Group(timeout=args.heartbeat_timeout).start()
