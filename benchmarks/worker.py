"""One side of one row, normally in a process of its own, driven by `benchmarks.run`.

A process per side keeps the two stacks from sharing threads, allocators or imports (the
reference's process never imports JAX), and makes each side's peak memory its own. The
coordinator sends one JSON command per line on stdin and reads one JSON reply per line from
the protocol pipe; anything the libraries print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.contention import Meter
from benchmarks.workload import resolve_row

MIB = 1 << 20


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs to build its side of a row."""

    side: str  # "ours" | "reference" | "limits"
    row: str = ""
    hf_dir: str = ""  # both sides load the benchmark weights from this HF checkpoint
    out_dir: str = ""  # where large check data (logits) is written
    decode_path: str = "engine"
    steps_per_call: int = 16
    new_tokens: int = 0  # shortens the decode rows when > 0 (smoke tests)
    compile_cache: str = ""  # our side's persistent compilation cache directory ("" = none)
    limits: dict[str, Any] = field(default_factory=dict)  # keyword arguments of limits.measure


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM); Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Session:
    """Builds one side's runner for a row; `warmup`, `run`, `finish` are the commands."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.row = resolve_row(spec.row, spec.new_tokens)
        start = time.perf_counter()
        if spec.side == "ours":
            from benchmarks.ours import make_runner
            from llama_jax import compile_cache

            if spec.compile_cache:
                compile_cache.enable(spec.compile_cache)

            self.runner = make_runner(
                Path(spec.hf_dir), self.row, spec.decode_path, spec.steps_per_call
            )
        else:
            from benchmarks import reference

            self.runner = reference.make_runner(Path(spec.hf_dir), self.row)
        self.setup_s = time.perf_counter() - start
        self.peak_before_reset_kib: int | None = None

    def warmup(self, n: int) -> dict[str, Any]:
        """The cold first call (compilation, first-touch allocations), then `n` untimed calls;
        afterwards the peak-RSS counter restarts so `finish` can tell steady-state peak apart."""
        cold = self.runner.run()
        for _ in range(n):
            self.runner.run()
        self.peak_before_reset_kib = _status_kib("VmHWM")
        if not _reset_peak_rss():
            self.peak_before_reset_kib = None
        return {"cold": cold, "setup_s": self.setup_s}

    def run(self) -> dict[str, float | None]:
        """One timed iteration, with this process's CPU time over it (all threads) and the
        share of the machine other processes used meanwhile (see `contention`)."""
        with Meter() as m:
            out = self.runner.run()
        return {**out, "cpu_s": m.cpu_s, "foreign": m.foreign}

    def finish(self) -> dict[str, Any]:
        check = self.runner.check()
        if "logits" in check:
            path = Path(self.spec.out_dir) / f"{self.spec.row}-{self.spec.side}-logits.npy"
            np.save(path, check.pop("logits"))
            check["logits_file"] = str(path)
        steady = _status_kib("VmHWM")
        peaks = [p for p in (steady, self.peak_before_reset_kib) if p is not None]
        return {
            "check": check,
            "peak_rss_mb": max(peaks) * 1024 / MIB if peaks else None,
            "steady_peak_rss_mb": (
                steady * 1024 / MIB if steady and self.peak_before_reset_kib else None
            ),
        }


def measure_limits(spec: Spec) -> dict[str, Any]:
    from benchmarks import limits

    return limits.measure(**spec.limits)


def build(spec: Spec) -> tuple[Session | None, dict[str, Any]]:
    """The session for `spec` and the first reply (the limits when that is the side)."""
    if spec.side == "limits":
        return None, measure_limits(spec)
    return Session(spec), {"ready": True}


def serve(spec: Spec, commands, reply) -> None:
    """Build, then answer commands until stdin closes. Errors are replied, not raised, so the
    coordinator can report them."""
    try:
        session, first = build(spec)
        reply({"ok": True, "result": first})
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        return
    for line in commands:
        cmd = json.loads(line)
        try:
            reply({"ok": True, "result": getattr(session, cmd["cmd"])(*cmd["args"])})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt replies

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    serve(spec, sys.stdin, reply)


if __name__ == "__main__":
    main()
