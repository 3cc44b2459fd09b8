"""`python -m benchmarks.gpu [--only train,decode] [--out results.json] [--tiny]`

Training, prefill and decode on one GPU, random weights, bfloat16 compute, each against the
chip's data-sheet peak (`PEAKS`, by device kind; utilisation is None for a kind not there).

- train_1b, train_8b: one AdamW step of `train.step.build_train_step` (state donated) on
  llama3.2-1b and llama3.1-8b shapes (8B at `TRAIN_8B_LAYERS` layers, below), 4096 tokens per
  row. MFU.
- prefill_8b: a 4096-token prompt into a fresh cache, one jitted `forward` (what the engine's
  prefill computes; `benchmarks.ours.Prefill`). MFU.
- decode_8b_b1, decode_8b_b64: `infer.engine.Engine` decode calls of `DECODE_STEPS` tokens per
  slot after a 1024-token prefill. Tokens/s and the share of the HBM bandwidth bound: the
  bytes a step must read (bfloat16 weights, the valid KV prefix) over the peak bandwidth.

FLOPs are the benchmarks' model FLOPs (`benchmarks.workload.train_flops`, `prefill_flops`):
N = `LlamaConfig.matmul_params()`, 6 N per trained token plus the causal attention, the same
count as the trainer's MFU (`train.metrics.flops_per_token`). Rematerialisation is not counted.

Both train rows run training's own recipe (`python -m llama_jax.train`): float32 master
weights, gradients and AdamW moments, 16 bytes per parameter. For all of llama3.1-8b that is
128 GB, which leaves a 141 GB H200 no room for activations, so train_8b keeps 16 of its 32
layers (4.5B parameters, 73 GB): every layer, the embedding and the head have 8B's shapes,
only the stack is shorter, and its MFU counts the FLOPs of the model it runs. (bfloat16
parameters and moments would fit all 32 layers, but `train.optim` promotes the first moment to
float32 at the first update: neither the state nor the step's compilation would stay put.)
Both save the matmul outputs of the forward pass (`remat="dots_no_batch"`: the backward pass
recomputes elementwise work and attention only) and compute the loss in `LOSS_CHUNKS` slices.
The inference rows hold bfloat16 weights and cache.

`--tiny` runs the same rows at toy shapes (the tiny preset, 64 tokens), so the benchmark runs
on a CPU (a minute or so, nearly all of it compiling) and a test keeps it working.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax

from benchmarks.ours import Prefill, Train, random_params
from benchmarks.report import target_marks
from benchmarks.workload import (
    WEIGHT_SEED,
    Row,
    decode_step_bytes,
    prefill_flops,
    prompt_tokens,
    train_flops,
)
from infer.engine import Chunk, Engine
from infer.sampling import SamplingParams
from llama_jax.config import LlamaConfig, preset
from llama_jax.model import attention_kernel

# Dense bfloat16 FLOP/s and HBM bytes/s of one chip, from NVIDIA's data sheets, by the exact
# `device_kind` (a prefix would take an H200 NVL or an H100 PCIe for the SXM parts).
PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # H100 SXM
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
}
# From the issue, on an H200.
TARGETS: dict[str, dict[str, float]] = {
    "train_1b": {"mfu": 0.45},
    "train_8b": {"mfu": 0.45},
    "prefill_8b": {"mfu": 0.60},
    "decode_8b_b1": {"bandwidth_util": 0.80},
}
KINDS = ("train", "prefill", "decode")
COMPUTE_DTYPE = "bfloat16"
TRAIN_PARAM_DTYPE = "float32"  # training's master weights and moments
TRAIN_8B_LAYERS = 16
BF16_BYTES = 2
TRAIN_REMAT = "dots_no_batch"
LOSS_CHUNKS = 4
DECODE_STEPS = 16  # decode steps per engine call; the first call (compiling) is not timed
# JAX takes 75% of GPU memory by default; the 8B step needs more of the 141 GB.
GPU_MEMORY_FRACTION = "0.95"


@dataclass(frozen=True)
class Case:
    """A row and the model it runs: a preset, with `n_layers` of its layers (0: all)."""

    row: Row
    preset: str
    n_layers: int = 0


def cases(tiny: bool) -> list[Case]:
    """The rows; `tiny` keeps their kinds and policies at toy shapes (CPU, tests)."""
    small, large = ("tiny", "tiny") if tiny else ("llama3.2-1b", "llama3.1-8b")
    seq, prompt, wide, train_1b_batch = (64, 16, 4, 2) if tiny else (4096, 1024, 64, 8)
    decode_calls = 3 if tiny else 8
    train_8b_layers = 1 if tiny else TRAIN_8B_LAYERS

    def decode(name: str, batch: int) -> Case:
        row = Row(name, "decode", batch, prompt, DECODE_STEPS * decode_calls, decode_calls)
        return Case(row, large)

    return [
        Case(Row("train_1b", "train", train_1b_batch, seq, iters=3), small),
        Case(Row("train_8b", "train", 2, seq, iters=3), large, train_8b_layers),
        Case(Row("prefill_8b", "prefill", 1, seq, iters=5), large),
        decode("decode_8b_b1", 1),
        decode("decode_8b_b64", wide),
    ]


def model_config(case: Case) -> LlamaConfig:
    """The case's preset, run as its row's kind runs: training's state and remat, or bfloat16
    weights for inference; bfloat16 compute either way."""
    train = case.row.kind == "train"
    layers = {"n_layers": case.n_layers} if case.n_layers else {}
    return preset(
        case.preset,
        param_dtype=TRAIN_PARAM_DTYPE if train else COMPUTE_DTYPE,
        compute_dtype=COMPUTE_DTYPE,
        remat=TRAIN_REMAT if train else "none",
        **layers,
    )


def _timed(run: Callable[[], float], iters: int) -> list[float]:
    """Seconds of `iters` runs after a cold one (compilation) and a warm one."""
    run()
    run()
    return [run() for _ in range(iters)]


def measure_train(config: LlamaConfig, row: Row) -> dict[str, Any]:
    train = Train(config, random_params(config, WEIGHT_SEED), row, LOSS_CHUNKS)
    seconds = _timed(lambda: train.run()["seconds"], row.iters)
    return {"seconds_all": seconds, "flops": train_flops(config, row)}


def measure_prefill(config: LlamaConfig, row: Row, params: Any) -> dict[str, Any]:
    prefill = Prefill(config, params, row)
    seconds = _timed(lambda: prefill.run()["seconds"], row.iters)
    return {"seconds_all": seconds, "flops": prefill_flops(config, row)}


def measure_decode(config: LlamaConfig, row: Row, params: Any) -> dict[str, Any]:
    """Prefill every slot with a `row.length`-token prompt, then time `row.iters` decode calls
    after one untimed (compiling) call."""
    engine = Engine(
        config,
        params,
        slots=row.batch,
        max_len=row.context + DECODE_STEPS,
        steps_per_call=DECODE_STEPS,
    )
    prompts = prompt_tokens(row, config.vocab_size).tolist()
    per = engine.blocks_per_seq  # each slot its own run of blocks, as many as its context
    blocks = [list(range(i * per, (i + 1) * per)) for i in range(row.batch)]
    step = engine.prefill_chunk
    for start in range(0, row.length, step):
        engine.prefill([
            Chunk(slot=i, tokens=p[start : start + step], start=start, blocks=blocks[i],
                  generated_from=len(p), last=start + step >= len(p),
                  settings=(SamplingParams(), 0))
            for i, p in enumerate(prompts)
        ])  # fmt: skip
    tables = engine.table(blocks, per)
    jax.block_until_ready(engine.decode(tables))

    def call() -> float:
        start = time.perf_counter()
        jax.block_until_ready(engine.decode(tables))
        return time.perf_counter() - start

    seconds = [call() for _ in range(row.iters)]
    # The timed steps read the prompt plus the untimed call's tokens before their own.
    read = dataclasses.replace(row, length=row.length + DECODE_STEPS)
    return {"seconds_all": seconds, "bytes_per_step": decode_step_bytes(config, read, BF16_BYTES)}


def figures(row: Row, measured: dict[str, Any], peak: tuple[float, float] | None) -> dict[str, Any]:
    """Throughput from the median call, and utilisation of the peak (None without one)."""
    seconds = statistics.median(measured["seconds_all"])
    out: dict[str, Any] = {**measured, "seconds": seconds}
    if row.kind == "decode":
        step = seconds / DECODE_STEPS
        out |= {"tokens_per_s": row.batch * DECODE_STEPS / seconds, "step_ms": 1e3 * step}
        bound = None if peak is None else measured["bytes_per_step"] / peak[1]
        out["bandwidth_util"] = None if bound is None else bound / step
    else:
        out["tokens_per_s"] = row.tokens / seconds
        out["tflops_per_s"] = measured["flops"] / seconds / 1e12
        out["mfu"] = None if peak is None else measured["flops"] / seconds / peak[0]
    out["targets"] = {
        key: {
            "target": goal,
            "value": out[key],
            "met": None if out[key] is None else out[key] >= goal,
        }
        for key, goal in TARGETS.get(row.name, {}).items()
    }
    return out


def run_case(case: Case, peak: tuple[float, float] | None, params: Any) -> dict[str, Any]:
    """One row's report; a row that fails on the device (out of memory, say) reports its
    error and the others still run."""
    config, row = model_config(case), case.row
    out: dict[str, Any] = {
        "name": row.name,
        "kind": row.kind,
        "preset": case.preset,
        "n_layers": config.n_layers,
        "params": config.param_count(),
        "shape": {"batch": row.batch, "length": row.length, "new_tokens": row.new_tokens},
        "param_dtype": config.param_dtype,
        "compute_dtype": COMPUTE_DTYPE,
        "remat": config.remat,
        # the cached path (prefill into a cache, decode) always attends through XLA
        "attention": attention_kernel(config, row.length) if row.kind == "train" else "xla",
    }
    try:
        if row.kind == "train":
            measured = measure_train(config, row)
        elif row.kind == "prefill":
            measured = measure_prefill(config, row, params)
        else:
            measured = measure_decode(config, row, params)
    except jax.errors.JaxRuntimeError as e:
        return {**out, "error": str(e).splitlines()[0]}
    return {**out, **figures(row, measured, peak)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    device = jax.devices()[0]
    peak = PEAKS.get(device.device_kind)
    chosen = [c for c in cases(args.tiny) if c.row.kind in args.only]
    rows = []
    weights: dict[LlamaConfig, Any] = {}  # the inference rows share one model's weights
    for case in chosen:
        params = None
        if case.row.kind != "train":
            config = model_config(case)
            if config not in weights:
                weights = {config: random_params(config, WEIGHT_SEED)}
            params = weights[config]
        rows.append(run_case(case, peak, params))
        gc.collect()  # the row's arrays go before the next row allocates its own
    return {
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "peak_flops": None if peak is None else peak[0],
            "peak_bytes_per_s": None if peak is None else peak[1],
        },
        "rows": rows,
        "meta": {
            "tiny": args.tiny,
            "train_remat": TRAIN_REMAT,
            "loss_chunks": LOSS_CHUNKS,
            "decode_steps_per_call": DECODE_STEPS,
            "versions": {p: version(p) for p in ("jax", "jaxlib", "flax")},
            "wall_s": round(time.time() - started, 1),
        },
    }


def _percent(value: float | None, what: str) -> str:
    return "n/a" if value is None else f"{value:.1%} {what}"


def table(report: dict[str, Any]) -> str:
    """Markdown table of a report."""
    lines = [
        "| row | model | batch x length | state | attention | tokens/s | throughput "
        "| utilisation | targets |",
        "|---|---|---|---|---|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        shape = f"{r['shape']['batch']} x {r['shape']['length']}"
        state = f"{r['param_dtype']}, remat {r['remat']}"
        model = f"{r['preset']} ({r['n_layers']} layers, {r['params'] / 1e9:.3g}B)"
        head = f"| {r['name']} | {model} | {shape} | {state} | {r['attention']} "
        if "error" in r:
            lines.append(f"{head}| failed: {r['error']} | | | |")
            continue
        if r["kind"] == "decode":
            speed = f"{r['step_ms']:.2f} ms/step"
            util = _percent(r["bandwidth_util"], "of HBM bound")
        else:
            speed = f"{r['tflops_per_s']:.3g} TFLOP/s"
            util = _percent(r["mfu"], "MFU")
        lines.append(
            f"{head}| {r['tokens_per_s']:,.0f} | {speed} | {util} | {target_marks(r['targets'])} |"
        )
    d = report["device"]
    if d["peak_flops"] is None:
        lines.append(f"\n{d['kind']}: no data-sheet peak known, so no utilisation.")
    else:
        lines.append(
            f"\n{d['kind']}: peaks {d['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense, "
            f"{d['peak_bytes_per_s'] / 1e12:.2f} TB/s HBM (data sheet)."
        )
    lines.append(
        f"Wall time {report['meta']['wall_s']:.0f} s. Train rows hold training's float32 "
        "state (16 bytes per parameter); train_8b keeps only as many of llama3.1-8b's layers "
        "as fit one chip with it. Prefill and decode attend through XLA (the cached path)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description="Training, prefill and decode on one GPU against its data-sheet peak.",
    )
    p.add_argument("--only", help=f"comma-separated row kinds ({','.join(KINDS)})")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--tiny", action="store_true", help="toy shapes, for a CPU")
    args = p.parse_args(argv)
    args.only = set(args.only.split(",")) if args.only else set(KINDS)
    if args.only - set(KINDS):
        p.error(f"--only: unknown {sorted(args.only - set(KINDS))}; choose from {KINDS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    main()
