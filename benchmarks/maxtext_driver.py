"""Compile MaxText's own train step AOT and print one JSON line of what the compiler planned.

    <maxtext-venv>/bin/python benchmarks/maxtext_driver.py compile_topology=v5p-8 ...

Runs in MaxText's virtualenv, never in ours, and imports nothing of this project: it is
`benchmarks.aot_maxtext`'s subprocess. It runs `maxtext.trainers.pre_train.train_compile.main`
unchanged (config parsing, mesh, shardings, jit and compile exactly as MaxText users run it),
capturing the compiled executable its `jit_and_compile` returns instead of rebuilding the step,
so nothing here can drift from MaxText's path. The arguments are MaxText's `key=value`
overrides of its packaged `base.yml`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

PREFIX = "AOT_MAXTEXT_JSON "  # the one stdout line the parent reads; MaxText prints a lot
# Custom calls libtpu's cost analysis counts -1 s for although they cost nothing (the same
# list as `sharding.aot.UNCOSTED_CUSTOM_CALLS`; the parent takes them back out).
COUNTED_CUSTOM_CALLS = ("ConcatBitcast",)


def main(overrides: list[str]) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: never grab an accelerator
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no libtpu lockfile to compile
    import jax
    from maxtext import configs
    from maxtext.trainers.pre_train import train_compile

    captured: list[Any] = []
    jit_and_compile = train_compile.jit_and_compile

    def capture(*args: Any, **kwargs: Any) -> Any:
        compiled = jit_and_compile(*args, **kwargs)
        captured.append(compiled)
        return compiled

    train_compile.jit_and_compile = capture
    base = str(pathlib.Path(configs.__file__).parent / "base.yml")
    start = time.perf_counter()
    train_compile.main([sys.argv[0], base, *overrides])
    seconds = time.perf_counter() - start
    compiled = captured[-1]
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    record = {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "optimal_seconds": float(cost.get("optimal_seconds", -1.0)),
        "uncosted_calls": sum(
            text.count(f'custom_call_target="{t}"') for t in COUNTED_CUSTOM_CALLS
        ),
        "compile_seconds": seconds,
        "jax": jax.__version__,
        "libtpu": _version("libtpu"),
        "maxtext": _version("maxtext"),
    }
    print(PREFIX + json.dumps(record), flush=True)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main(sys.argv[1:])
