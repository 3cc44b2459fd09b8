"""`python -m benchmarks.aot_maxtext [--rows 8b,70b,405b] [--out FILE.json]`

Our train step against MaxText's, both compiled ahead of time by the same libtpu for the same
TPU topology, model, global batch, sequence, remat policy and dtypes, on this (CPU) machine.
What the compiler planned is compared: per-chip memory (arguments + temporaries + outputs not
aliased to donated inputs) and its estimated step time, as tokens/s/chip.

MaxText (`maxtext[tpu]`, `MAXTEXT_VERSION`) lives in a virtualenv of its own under `~/.cache`
(created on first use), pinned to our jax, jaxlib and libtpu so both sides run one compiler;
`benchmarks/maxtext_driver.py` runs its `train_compile` there and prints one JSON line. Our side
is `python -m sharding.aot --json` in this interpreter. Each compile is a process of its own:
libtpu keeps process-wide state, and a 2-core machine runs them one at a time anyway.

Step-time estimates: XLA's cost analysis counts a scanned layer stack's body once, so both
sides are costed on unrolled models, extrapolated from 1- and 2-layer compiles (what
`sharding.aot` does for ours; for MaxText, `scan_layers=false base_num_decoder_layers=N`).
`--maxtext-full-unscanned` costs MaxText on its whole unscanned model instead (the 8B one takes
~10 minutes on 2 cores; it agrees with the extrapolation, see benchmarks/README.md). Memory
always comes from the scanned compile, as MaxText users run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

MAXTEXT_VERSION = "0.2.5"
VENV = Path.home() / ".cache" / "llama-jax" / "maxtext-venv"
WORKDIR = Path.home() / ".cache" / "llama-jax" / "maxtext-work"  # MaxText's cwd: it may write
DRIVER = Path(__file__).resolve().parent / "maxtext_driver.py"
CHECKOUT = Path(__file__).resolve().parents[1]
PREFIX = "AOT_MAXTEXT_JSON "  # = maxtext_driver.PREFIX (that file imports nothing of ours)
PINNED = ("jax", "jaxlib", "libtpu")  # one compiler: MaxText's venv gets exactly our versions
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)  # = sharding.aot's (kept import-free of jax here)
GB = 1e9


@dataclass(frozen=True)
class Row:
    """One comparison: the same run described in both tools' terms."""

    name: str
    preset: str  # ours and MaxText's model_name alike
    topology: str  # ours, e.g. v5p:2x2x1
    maxtext_topology: str  # MaxText's, e.g. v5p-8 (v5p names count TensorCores, 2 per chip)
    chips: int
    batch: int  # global
    seq: int
    mesh: str  # ours
    maxtext_mesh: tuple[str, ...] = ()  # MaxText's ici_* overrides (default: fsdp over all)
    remat: str = "full"


ROWS = {
    "8b": Row("8b", "llama3.1-8b", "v5p:2x2x1", "v5p-8", 4, 4, 4096, "fsdp=-1"),
    "70b": Row("70b", "llama3.1-70b", "v5p:4x4x4", "v5p-128", 64, 64, 4096, "fsdp=-1"),
    "405b": Row(
        "405b",
        "llama3.1-405b",
        "v5p:8x8x4",
        "v5p-512",
        256,
        64,
        8192,
        "fsdp=-1,sequence=4",
        # MaxText's base.yml mesh has no `sequence` axis: splitting the sequence is `context`.
        ("ici_fsdp_parallelism=64", "ici_context_parallelism=4"),
    ),
}


@dataclass(frozen=True)
class Side:
    """What the compiler planned for one side of a row (bytes per chip, seconds per step)."""

    argument_bytes: int
    temp_bytes: int
    unaliased_output_bytes: int
    est_step_seconds: float | None
    compile_seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def per_chip_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.unaliased_output_bytes


def maxtext_overrides(row: Row, *, scan: bool, layers: int | None = None) -> list[str]:
    """MaxText `key=value` overrides for `row`: its base.yml defaults (weight_dtype float32,
    dtype bfloat16, AdamW, attention autoselected = splash on TPU) plus the run's shape."""
    args = [
        f"compile_topology={row.maxtext_topology}",
        "compile_topology_num_slices=1",
        f"model_name={row.preset}",
        f"per_device_batch_size={_number(row.batch / row.chips)}",
        f"max_target_length={row.seq}",
        f"remat_policy={row.remat}",
        f"scan_layers={str(scan).lower()}",
        *row.maxtext_mesh,
    ]
    if layers is not None:
        args += [f"base_num_decoder_layers={layers}", "override_model_config=true"]
    return args


def ours_args(row: Row) -> list[str]:
    """`python -m sharding.aot` arguments for `row` (its run policy: bf16 compute, fp32 master
    weights and AdamW moments, splash attention, loss over 8 sequence slices)."""
    return [
        *("--preset", row.preset, "--topology", row.topology, "--mesh", row.mesh),
        *("--batch", str(row.batch), "--seq", str(row.seq), "--remat", row.remat, "--json"),
    ]


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def parse_driver_output(stdout: str) -> dict[str, Any]:
    """The driver's JSON record: the last stdout line starting with `PREFIX`."""
    lines = [line for line in stdout.splitlines() if line.startswith(PREFIX)]
    if not lines:
        raise RuntimeError("maxtext_driver printed no result line:\n" + stdout[-3000:])
    return json.loads(lines[-1][len(PREFIX) :])


def driver_seconds(record: dict[str, Any]) -> float | None:
    """libtpu's "optimal_seconds" with the placeholders of calls that cost nothing taken back
    out (as `sharding.aot.compiled_seconds` does); None when it stays negative."""
    seconds = record["optimal_seconds"] + record["uncosted_calls"]
    return seconds if seconds > 0 else None


def extrapolate(one: float | None, two: float | None, layers: int) -> float | None:
    """The cost of `layers` layers from the costs of 1- and 2-layer unrolled models."""
    if one is None or two is None:
        return None
    return one + (layers - 1) * (two - one)


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> tuple[str, float]:
    """Run one compile at the lowest CPU priority (other work on the machine keeps its share);
    (stdout, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["nice", "-n", "19", *cmd],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return proc.stdout, time.perf_counter() - start


def _compile_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def maxtext_compile(python: Path, args: list[str], timeout: float) -> dict[str, Any]:
    WORKDIR.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(DRIVER), *args]
    out, wall = _run(cmd, env=_compile_env(), cwd=WORKDIR, timeout=timeout)
    return {**parse_driver_output(out), "wall_seconds": wall}


def maxtext_side(python: Path, row: Row, layers: int, *, full: bool, timeout: float) -> Side:
    """MaxText's memory (scanned compile) and step-time estimate (unscanned compiles)."""
    log(f"[{row.name}] MaxText: scanned compile (memory)")
    scanned = maxtext_compile(python, maxtext_overrides(row, scan=True), timeout)
    spent = scanned["wall_seconds"]
    if full:
        log(f"[{row.name}] MaxText: unscanned compile of all {layers} layers (step time)")
        unscanned = maxtext_compile(python, maxtext_overrides(row, scan=False), timeout)
        spent += unscanned["wall_seconds"]
        seconds, costed = driver_seconds(unscanned), {"full": unscanned}
    else:
        costed = {}
        for n in (1, 2):
            log(f"[{row.name}] MaxText: unscanned {n}-layer compile (step time)")
            costed[f"layers_{n}"] = maxtext_compile(
                python, maxtext_overrides(row, scan=False, layers=n), timeout
            )
            spent += costed[f"layers_{n}"]["wall_seconds"]
        one, two = (driver_seconds(costed[f"layers_{n}"]) for n in (1, 2))
        seconds = extrapolate(one, two, layers)
    return Side(
        argument_bytes=scanned["argument_bytes"],
        temp_bytes=scanned["temp_bytes"],
        unaliased_output_bytes=scanned["output_bytes"] - scanned["alias_bytes"],
        est_step_seconds=seconds,
        compile_seconds=spent,
        detail={"scanned": scanned, **costed},
    )


def ours_side(row: Row, timeout: float) -> Side:
    log(f"[{row.name}] ours: python -m sharding.aot (full compile + 1- and 2-layer costs)")
    cmd = [sys.executable, "-m", "sharding.aot", *ours_args(row)]
    out, wall = _run(cmd, env=_compile_env(), cwd=CHECKOUT, timeout=timeout)
    report = json.loads(out.strip().splitlines()[-1])
    return Side(
        argument_bytes=report["argument_bytes"],
        temp_bytes=report["temp_bytes"],
        unaliased_output_bytes=report["output_bytes"] - report["alias_bytes"],
        est_step_seconds=report["est_step_seconds"],
        compile_seconds=wall,
        detail=report,
    )


def tokens_per_sec_per_chip(row: Row, side: Side) -> float | None:
    s = side.est_step_seconds
    return row.batch * row.seq / s / row.chips if s else None


def targets(row: Row, ours: Side, maxtext: Side) -> dict[str, bool | None]:
    """The issue's targets: ours <= MaxText's per-chip memory, >= its estimated tokens/s/chip
    (None: a side has no estimate)."""
    a, b = tokens_per_sec_per_chip(row, ours), tokens_per_sec_per_chip(row, maxtext)
    return {
        "memory": ours.per_chip_bytes <= maxtext.per_chip_bytes,
        "tokens_per_sec": None if a is None or b is None else a >= b,
    }


def result(row: Row, ours: Side, maxtext: Side) -> dict[str, Any]:
    return {
        "row": asdict(row),
        "ours": {**asdict(ours), "per_chip_bytes": ours.per_chip_bytes},
        "maxtext": {**asdict(maxtext), "per_chip_bytes": maxtext.per_chip_bytes},
        "ours_tokens_per_sec_per_chip": tokens_per_sec_per_chip(row, ours),
        "maxtext_tokens_per_sec_per_chip": tokens_per_sec_per_chip(row, maxtext),
        "targets": targets(row, ours, maxtext),
    }


def table(results: list[dict[str, Any]]) -> str:
    """The README's markdown table, from `result` records."""
    lines = [
        "| model | topology (chips) | global batch x seq | per chip: args + temps, ours / MaxText "
        "| est. step ours / MaxText | tokens/s/chip ours / MaxText | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row, ours, mt, met = r["row"], r["ours"], r["maxtext"], r["targets"]
        verdict = ", ".join(
            f"{name} {'n/a' if ok is None else 'ok' if ok else 'MISSED'}"
            for name, ok in (("memory", met["memory"]), ("tokens/s", met["tokens_per_sec"]))
        )
        lines.append(
            f"| {row['preset']} | {row['topology']} = {row['maxtext_topology']} ({row['chips']}) "
            f"| {row['batch']} x {row['seq']} | {_memory(ours)} / {_memory(mt)} "
            f"| {_secs(ours['est_step_seconds'])} / {_secs(mt['est_step_seconds'])} "
            f"| {_rate(r['ours_tokens_per_sec_per_chip'])} / "
            f"{_rate(r['maxtext_tokens_per_sec_per_chip'])} | {verdict} |"
        )
    return "\n".join(lines)


def _memory(side: dict[str, Any]) -> str:
    args, temps, total = (side[k] / GB for k in ("argument_bytes", "temp_bytes", "per_chip_bytes"))
    return f"{args:.1f} + {temps:.1f} = {total:.1f} GB"


def _secs(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.2f} s"


def _rate(r: float | None) -> str:
    return "n/a" if r is None else f"{r:,.0f}"


def pip_install_command(python: Path) -> list[str]:
    """MaxText with its `tpu` extra, jax/jaxlib/libtpu held at our versions."""
    pins = [f"{name}=={version(name)}" for name in PINNED]
    constraints = WORKDIR / "constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("\n".join(pins) + "\n")
    return [str(python), "-m", "pip", "install", "-q", f"maxtext[tpu]=={MAXTEXT_VERSION}",
            "-c", str(constraints)]  # fmt: skip


def ensure_venv(venv: Path) -> Path:
    """MaxText's virtualenv (Python 3.12, as ours), created on first use; returns its python
    after checking that it runs our compiler."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} (Python 3.12) for maxtext[tpu]=={MAXTEXT_VERSION}: a few minutes")
        subprocess.run(["nice", "-n", "19", sys.executable, "-m", "venv", str(venv)], check=True)
    have = installed(python)
    if have.get("maxtext") != MAXTEXT_VERSION or any(have.get(n) != version(n) for n in PINNED):
        log(f"installing maxtext[tpu]=={MAXTEXT_VERSION} into {venv}")
        subprocess.run(["nice", "-n", "19", *pip_install_command(python)], check=True)
        have = installed(python)
    mismatch = {n: (version(n), have.get(n)) for n in PINNED if have.get(n) != version(n)}
    if mismatch:
        raise SystemExit(f"MaxText's venv does not run our compiler (ours, its): {mismatch}")
    log("same compiler: " + ", ".join(f"{n} {have[n]}" for n in (*PINNED, "maxtext")))
    return python


def installed(python: Path) -> dict[str, str]:
    """Versions of the pinned packages and maxtext in another interpreter."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{n: v(n) for n in {[*PINNED, 'maxtext']!r}}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.aot_maxtext", description=__doc__)
    p.add_argument("--rows", default="8b,70b,405b", help="comma-separated of: " + ",".join(ROWS))
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--venv", type=Path, default=VENV, help="MaxText's virtualenv")
    p.add_argument("--maxtext-full-unscanned", action="store_true", help=(
        "cost MaxText on its whole unscanned model, not 1- and 2-layer compiles (slow)"))  # fmt: skip
    p.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    args = p.parse_args(argv)
    rows = [ROWS[name] for name in args.rows.split(",")]
    python = ensure_venv(args.venv)
    from llama_jax.config import preset  # after the venv work: this imports jax

    results = []
    for row in rows:
        layers = preset(row.preset).n_layers
        ours = ours_side(row, args.timeout)
        maxtext = maxtext_side(
            python, row, layers, full=args.maxtext_full_unscanned, timeout=args.timeout
        )
        results.append(result(row, ours, maxtext))
        log(
            f"[{row.name}] compiles took ours {ours.compile_seconds:.0f} s, "
            f"MaxText {maxtext.compile_seconds:.0f} s"
        )
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
