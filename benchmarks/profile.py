"""`python -m benchmarks.profile ROW [--iters N] [--top K]`: where our side of a row spends time.

Runs our runner for the row (warm), records a JAX profiler trace of a few iterations and prints
the XLA operations (thunks) by total time per iteration, summed over the intra-op threads, with
the share of the iteration's wall time. This is the evidence behind "what limits each row".
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.ours import make_runner
from benchmarks.run import export_weights
from benchmarks.workload import BENCH_PRESET, ROWS_BY_NAME, WEIGHT_SEED

# Events that wrap others (executors, Python frames): excluded so each op is counted once.
_WRAPPERS = ("ThunkExecutor", "$", "PjRt", "Execute", "while", "call", "conditional")


def op_times(trace_dir: Path) -> collections.Counter[str]:
    """Total nanoseconds per XLA op name over every thread of the trace."""
    totals: collections.Counter[str] = collections.Counter()
    for path in trace_dir.rglob("*.xplane.pb"):
        data = jax.profiler.ProfileData.from_file(str(path))
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for event in line.events:
                    if not event.name.startswith(_WRAPPERS):
                        totals[event.name] += event.duration_ns
    return totals


def profile(row_name: str, preset_name: str, iters: int, decode_path: str) -> str:
    row = ROWS_BY_NAME[row_name]
    with tempfile.TemporaryDirectory() as tmp:
        runner = make_runner(
            export_weights(preset_name, WEIGHT_SEED, Path(tmp) / "hf"), row, decode_path
        )
        runner.run()  # compile
        runner.run()
        jax.profiler.start_trace(tmp)
        start = time.perf_counter()
        for _ in range(iters):
            runner.run()
        wall = (time.perf_counter() - start) / iters
        jax.profiler.stop_trace()
        totals = op_times(Path(tmp))
    busy = sum(totals.values()) / iters
    lines = [
        f"{row_name}: {wall * 1e3:.1f} ms per iteration (traced), "
        f"{busy / 1e6:.1f} ms of op time over all threads",
        f"{'ms/iter':>9} {'% wall':>7}  op",
    ]
    for name, ns in totals.most_common():
        ms = ns / iters / 1e6
        lines.append(f"{ms:9.2f} {ms / (wall * 1e3):7.1%}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("row", choices=sorted(ROWS_BY_NAME))
    p.add_argument("--preset", default=BENCH_PRESET)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--decode-path", choices=("engine", "loop"), default="loop")
    args = p.parse_args(argv)
    report = profile(args.row, args.preset, args.iters, args.decode_path)
    print("\n".join(report.splitlines()[: args.top + 2]))


if __name__ == "__main__":
    main()
