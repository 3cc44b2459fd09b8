"""`python -m benchmarks.run [--only decode,prefill,train] [--out results.json]`

Ours (JAX) against `transformers` (PyTorch CPU) on identical weights, in one run: for each row
both sides are built in processes of their own, warmed up, then timed alternately (ours,
reference, reference, ours, ...) so machine noise hits both alike; medians are reported. The
machine's matmul peak and read bandwidth are measured first, in a third process.

Our side runs as the command-line tools do, with JAX's persistent compilation cache (see
`llama_jax.compile_cache`), in a directory private to the run. Each row first starts our side
once to fill it (its cold start and peak memory are reported as `first_start`); the measured
process then starts as every later start would, loading the executables instead of compiling.
`--no-compile-cache` measures without the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.contention import wait_for_quiet
from benchmarks.ours import random_params
from benchmarks.report import add_quantized_speedups, row_report, table
from benchmarks.worker import Spec, build
from benchmarks.workload import BENCH_PRESET, ROWS, WEIGHT_SEED, Row, resolve_row
from llama_jax.api import Model
from llama_jax.checkpoint.export import export
from llama_jax.config import preset

# XLA CPU settings for our side; recorded in the report. (Set before JAX starts, so per process.)
OURS_XLA_FLAGS = ""


CHECKOUT = Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
    """A worker failed; the message carries its traceback."""


class ProcessWorker:
    """A worker in a child process (the normal mode: per-side threads and memory)."""

    def __init__(self, spec: Spec):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        if spec.side == "ours" and OURS_XLA_FLAGS:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {OURS_XLA_FLAGS}".strip()
        self.side = spec.side
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(dataclasses.asdict(spec))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=CHECKOUT,  # `benchmarks` is not installed: it runs from the checkout
        )

    def _read(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.side} worker exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(f"{self.side} worker failed:\n{reply['error']}")
        return reply["result"]

    def ready(self) -> Any:
        return self._read()

    def call(self, cmd: str, *args: Any) -> Any:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class LocalWorker:
    """The same commands served in this process (smoke tests: fast, but memory is shared)."""

    def __init__(self, spec: Spec):
        self.spec, self.session = spec, None

    def ready(self) -> Any:
        self.session, first = build(self.spec)
        return first

    def call(self, cmd: str, *args: Any) -> Any:
        return json.loads(json.dumps(getattr(self.session, cmd)(*args)))

    def close(self) -> None:
        self.session = None


def select_rows(only: str | None) -> list[Row]:
    """Rows whose kind or name is in the comma-separated `only` (all rows when None)."""
    if not only:
        return list(ROWS)
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    rows = [r for r in ROWS if r.kind in wanted or r.name in wanted]
    unknown = wanted - {r.kind for r in ROWS} - {r.name for r in ROWS}
    if unknown or not rows:
        names = sorted({r.kind for r in ROWS} | {r.name for r in ROWS})
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {names}")
    return rows


def export_weights(preset_name: str, seed: int, dst: Path) -> Path:
    """Our benchmark weights written as an HF checkpoint, for the reference to load."""
    config = preset(preset_name)
    return export(Model(config, random_params(config, seed)), dst, "hf")


def measure_row(row: Row, spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """Warm both sides up, then time them alternately; returns raw results per side."""
    worker_cls = LocalWorker if args.in_process else ProcessWorker
    spec = dataclasses.replace(spec, row=row.name)
    if spec.compile_cache:  # a cache per row: its first start compiles everything it runs
        spec = dataclasses.replace(spec, compile_cache=str(Path(spec.compile_cache) / row.name))
    first_start = _fill_compile_cache(worker_cls, dataclasses.replace(spec, side="ours"))
    workers = {
        side: worker_cls(dataclasses.replace(spec, side=side)) for side in ("ours", "reference")
    }
    try:
        for w in workers.values():
            w.ready()
        out = {side: {"warmup": w.call("warmup", args.warmup)} for side, w in workers.items()}
        for side in workers:
            out[side]["runs"] = []
        wait_for_quiet(args.max_foreign, args.quiet_wait)
        retried = 0
        for i in range(args.iters or row.iters):
            order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
            for attempt in range(args.retries + 1):
                pair = {side: workers[side].call("run") for side in order}
                if not _contended(pair.values(), args.max_foreign) or attempt == args.retries:
                    break
                retried += 1
                wait_for_quiet(args.max_foreign, args.quiet_wait)
            for side in order:
                out[side]["runs"].append(pair[side])
        out["retried_pairs"] = retried
        for side, w in workers.items():
            out[side] |= w.call("finish")
        if first_start is not None:
            out["ours"]["first_start"] = first_start
        return out
    finally:
        for w in workers.values():
            w.close()


def _fill_compile_cache(worker_cls, spec: Spec) -> dict[str, Any] | None:
    """Start our side once so that its compilation cache holds the row's executables; returns
    that first start's cold run and peak memory (None without a cache)."""
    if not spec.compile_cache:
        return None
    worker = worker_cls(spec)
    try:
        worker.ready()
        cold = worker.call("warmup", 0)["cold"]
        return {"cold": cold, "peak_rss_mb": worker.call("finish")["peak_rss_mb"]}
    finally:
        worker.close()


def _contended(runs, max_foreign: float) -> bool:
    return any(r["foreign"] is not None and r["foreign"] > max_foreign for r in runs)


def _versions() -> dict[str, str]:
    return {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = preset(args.preset)
    rows = select_rows(args.only)
    started, load_before = time.time(), os.getloadavg()
    limit_kwargs = {"sizes": (256,), "nbytes": 1 << 24, "repeats": 2} if args.quick_limits else {}
    wait_for_quiet(args.max_foreign, args.quiet_wait)
    limits_spec = Spec(side="limits", limits=limit_kwargs)
    limits_worker = (LocalWorker if args.in_process else ProcessWorker)(limits_spec)
    limits = limits_worker.ready()
    limits_worker.close()
    # In-process workers share this process's JAX, whose configuration the cache would change.
    use_cache = not (args.no_compile_cache or args.in_process)
    with tempfile.TemporaryDirectory(prefix="llama-jax-bench-") as tmp:
        hf_dir = export_weights(args.preset, WEIGHT_SEED, Path(tmp) / "hf")
        spec = Spec(
            side="",
            hf_dir=str(hf_dir),
            out_dir=tmp,
            decode_path=args.decode_path,
            steps_per_call=args.steps_per_call,
            new_tokens=args.new_tokens,
            compile_cache=str(Path(tmp) / "xla-cache") if use_cache else "",
        )
        rows = [resolve_row(row.name, args.new_tokens) for row in rows]
        measured = [(row, measure_row(row, spec, args)) for row in rows]
        report_rows = [row_report(row, config, limits, m) for row, m in measured]
        add_quantized_speedups(report_rows, {row.name: row.variant for row in rows})
    return {
        "limits": limits,
        "rows": report_rows,
        "meta": {
            "preset": args.preset,
            "param_count": config.param_count(),
            "decode_path": args.decode_path,
            "steps_per_call": args.steps_per_call,
            "ours_xla_flags": OURS_XLA_FLAGS,
            "ours_compile_cache": use_cache,
            "warmup": args.warmup,
            "new_tokens_override": args.new_tokens,
            "max_foreign": args.max_foreign,
            "in_process": args.in_process,
            "versions": _versions(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[2])
    p.add_argument("--only", help="comma-separated row kinds or names (decode,prefill,train)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--preset", default=BENCH_PRESET, help="model preset (default %(default)s)")
    p.add_argument("--iters", type=int, default=0, help="timed runs per side (default: per row)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the cold one")
    p.add_argument("--decode-path", choices=("engine", "loop"), default="engine")
    p.add_argument("--steps-per-call", type=int, default=16, help="decode steps per jit call")
    p.add_argument("--new-tokens", type=int, default=0, help="shorten decode rows (smoke tests)")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.1,
        help="re-run a pair of timings when other processes used more than this share of the "
        "machine during it (default %(default)s; 1 disables)",
    )
    p.add_argument("--retries", type=int, default=3, help="re-runs per contended pair")
    p.add_argument("--quiet-wait", type=float, default=120, help="seconds to wait for quiet")
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="our side compiles at every start (default: a persistent cache, filled first)",
    )
    p.add_argument("--in-process", action="store_true", help="no worker processes (tests)")
    p.add_argument("--quick-limits", action="store_true", help="tiny limit probes (tests)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
