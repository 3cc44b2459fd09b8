"""Compile a real train or decode step for a real TPU topology on this (CPU) machine.

    python -m sharding.aot --preset llama3.1-8b --topology v5p:2x2x1 --batch 4 --seq 4096

`libtpu` compiles for the topology's compile-only devices (`jax.experimental.topologies`): no TPU,
nothing allocated. What comes back is what the TPU compiler planned: per-chip memory
(arguments, temporaries, outputs not aliased to donated inputs) against the chip's HBM, the
compiler's FLOPs and step-time estimate, and from them MFU and tokens/s/chip. This is the proof
that a preset fits, and how much room it leaves, before anyone pays for a pod.

A tool above the packages: it imports `train` (the real train step), which the `sharding`
library modules never do.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab a local accelerator: compile only
# Compiling needs no TPU ownership, so don't take libtpu's one-process lockfile: two AOT runs
# (or a test beside a user's run) would otherwise abort each other.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model as llama_model
from llama_jax.config import (
    ATTENTION_KERNELS,
    CONTEXT_PARALLEL,
    DTYPES,
    REMAT_POLICIES,
    LlamaConfig,
    preset,
)
from llama_jax.kv_cache import (
    QUANTIZED,
    KVCache,
    PagedKVCache,
)
from llama_jax.lora import LoraConfig, parse_targets
from llama_jax.partitioning import placed_shapes
from llama_jax.quantize import MODES, is_quantized, quantized_logical_axes, quantized_shapes
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import DEFAULT_MESH, PRESET_NAMES, logical_to_sharding, with_rules
from train.metrics import flops_per_token
from train.optim import OptimConfig, make_optimizer
from train.step import BASE, BATCH_KEYS, Policy, abstract_train_state, build_step, lm_objective

GiB = 1024**3
LOSS_CHUNKS = 8  # train steps: float32 logits of 1/8 of each sequence at a time
# Custom calls libtpu's cost analysis cannot cost: each adds a -1 s placeholder to the step's
# "optimal_seconds". "ConcatBitcast" joins the slices of a sliced HBM->VMEM prefetch (memory
# space assignment) back into one buffer in place, so it costs nothing itself; the slices'
# copies are costed. v5e and v6e compiles of large steps hold many of them.
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)
# How the tool runs a preset unless told otherwise (presets hold the architecture only): bf16
# matmuls, whole layers rematerialised; train steps keep fp32 master weights, decode steps
# read bf16 weights.
RUN_POLICY = {"compute_dtype": "bfloat16", "remat": "full"}
# Decode steps' KV cache: one row of `seq` slots per sequence, or a pool of fixed-size blocks
# (what `infer.engine` serves from) holding the same tokens. 16-token blocks, the engine's
# default: the block sets the table's width and the granularity of the reads; the pool
# (heads-first, [layers, kv_heads, blocks, block_size, head_dim]) is tiled over
# [block_size, head_dim], so its bytes are the same for any multiple of 16 (bf16) that
# divides `seq`.
KV_LAYOUTS = ("contiguous", "paged")
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float


# Per-chip HBM and dense bf16 peak, from the public Cloud TPU system-architecture docs
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12),
    "v5e": Chip(16 * GiB, 197e12),
    "v5p": Chip(95 * GiB, 459e12),
    "v6e": Chip(32 * GiB, 918e12),
}


@dataclass(frozen=True)
class Report:
    """One compiled step. Bytes and compiler FLOPs are per chip; `flops_per_step` is the model
    FLOPs of the whole step (all chips, no rematerialisation), which MFU is measured in."""

    preset: str
    step: str
    topology: str
    chips: int
    mesh: dict[str, int]
    rules: str
    batch: int
    seq: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    per_chip_bytes: int
    hbm_bytes: int
    fits: bool
    flops_per_step: float
    compiler_flops_per_chip: float
    cost_complete: bool  # False: the compiler counted fewer FLOPs than the model needs
    est_step_seconds: float | None  # None: no compiler estimate (`no_estimate` says why)
    est_mfu: float | None
    tokens_per_sec_per_chip: float | None
    no_estimate: str | None = None
    kv: str | None = None  # decode steps: the KV cache layout (`KV_LAYOUTS`)
    block_size: int | None = None  # a paged cache's tokens per block
    kv_cache_dtype: str | None = None  # decode steps with an int8 KV cache: "int8"
    quantize: str | None = None  # decode steps with quantized weights: "int8" or "fp8"
    lora: str | None = None  # train steps with LoRA: rank and targets, e.g. "r=16 on q,v"


def topology_devices(topology: str, slices: int = 1) -> list[Any]:
    """Compile-only devices of `topology` (e.g. "v5p:2x2x1") times `slices` (DCN)."""
    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices)
    except RuntimeError as e:  # no libtpu, or a name libtpu does not know
        raise SystemExit(
            f"cannot build TPU topology {topology!r}: {e}\n(needs libtpu: pip install "
            "'llama-jax[tpu]'; names look like v5p:2x2x1, v5e:4x4, v4:2x2x2, v6e:2x2)"
        ) from None


def chip_of(topology: str) -> Chip:
    generation = topology.split(":")[0]
    if generation not in CHIPS:
        raise SystemExit(f"unknown TPU generation {generation!r}; known: {', '.join(CHIPS)}")
    return CHIPS[generation]


def compile_train(
    config: LlamaConfig,
    mesh: jax.sharding.Mesh,
    rules: str,
    batch: int,
    seq: int,
    *,
    loss_chunks: int = 1,
    lora: LoraConfig | None = None,
):
    """The real `train.step` train step (AdamW, fp32 master weights), state donated. With
    `lora`: the state holds the adapters and their moments; the frozen base is an undonated
    argument in the compute dtype."""
    optimizer = make_optimizer(OptimConfig())
    state = abstract_train_state(config, optimizer, lora)
    state_sh = place.tree_shardings(state, config, mesh, rules, lora)
    frozen = {}
    if lora is not None:
        frozen[BASE] = llama_model.param_shapes(config.replace(param_dtype=config.compute_dtype))
    frozen_sh = place.tree_shardings(frozen, config, mesh, rules)
    dtypes = {k: jnp.float32 if k == "loss_mask" else jnp.int32 for k in BATCH_KEYS}
    data = {k: jax.ShapeDtypeStruct((batch, seq), dt) for k, dt in dtypes.items()}
    data_sh = place.batch_shardings(data, mesh, rules)
    step = build_step(lm_objective(Policy(config, lora), loss_chunks), optimizer)
    jitted = jax.jit(
        with_rules(step, mesh, rules),
        in_shardings=(state_sh, data_sh, frozen_sh),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    args = (state, state_sh), (data, data_sh), (frozen, frozen_sh)
    return jitted.lower(*(placed_shapes(x, sh) for x, sh in args)).compile()


def decode_cache(
    config: LlamaConfig,
    batch: int,
    seq: int,
    kv: str = "contiguous",
    block_size: int = BLOCK_SIZE,
    kv_cache_dtype: str | None = None,
) -> KVCache | PagedKVCache:
    """The abstract cache of a decode step: `batch` rows of `seq` slots, or a pool of the same
    `batch * seq` tokens in `block_size`-token blocks with a [batch, seq / block_size] table;
    stored in the compute dtype, or int8 with scales (`kv_cache_dtype="int8"`)."""
    if kv == "contiguous":
        return KVCache.abstract(config, batch, seq, kv_cache_dtype)
    if seq % block_size:
        raise SystemExit(f"--seq {seq} is not a multiple of --block-size {block_size}")
    width = seq // block_size

    def paged() -> PagedKVCache:
        k, v = PagedKVCache.pool_zeros(config, batch * width, block_size, kv_cache_dtype)
        tables = jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width)
        return PagedKVCache(k, v, tables, jnp.zeros((batch,), jnp.int32))

    return jax.eval_shape(paged)


def compile_decode(
    config: LlamaConfig,
    mesh: jax.sharding.Mesh,
    rules: str,
    batch: int,
    seq: int,
    *,
    kv: str = "contiguous",
    block_size: int = BLOCK_SIZE,
    kv_cache_dtype: str | None = None,
    quantize: str | None = None,
):
    """One decode token per sequence against a full cache of `seq` tokens per sequence (donated;
    `decode_cache`), bf16 weights, or with `quantize` int8/fp8 projections and head."""
    params = llama_model.param_shapes(config)
    params_sh = place.tree_shardings(params, config, mesh, rules)
    if quantize is not None:
        params, params_sh = quantized_decode_params(params, config, mesh, rules, quantize)
    cache = decode_cache(config, batch, seq, kv, block_size, kv_cache_dtype)
    cache_sh = place.cache_shardings(cache, mesh, rules)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    tokens_sh = place.batch_shardings({"tokens": tokens}, mesh, rules)["tokens"]
    step = jax.jit(
        with_rules(partial(_decode, config=config), mesh, rules),
        in_shardings=(params_sh, tokens_sh, cache_sh),
        out_shardings=(tokens_sh, cache_sh),
        donate_argnums=2,
    )
    return step.lower(
        placed_shapes(params, params_sh),
        placed_shapes(tokens, tokens_sh),
        placed_shapes(cache, cache_sh),
    ).compile()


def quantized_decode_params(
    shapes: Any, config: LlamaConfig, mesh: jax.sharding.Mesh, rules: str, mode: str
) -> tuple[Any, Any]:
    """The abstract params `quantize_params` makes from `shapes`, and their shardings from the
    quantized logical axes (values split like the float weight, scales like its outputs)."""
    quantized = quantized_shapes(shapes, config, mode)
    axes = quantized_logical_axes(llama_model.logical_axes(config), config)
    is_axes = lambda x: isinstance(x, tuple) and not is_quantized(x)  # noqa: E731
    shardings = jax.tree.map(
        lambda names, s: logical_to_sharding(names, mesh, rules, s.shape, "quantized weight"),
        axes,
        quantized,
        is_leaf=is_axes,
    )
    return quantized, shardings


def _decode(params, tokens, cache, *, config):
    """Greedy next token: what a decode step returns to the host."""
    logits, cache = llama_model.forward(params, tokens, cache=cache, config=config)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """Trace with every `lax.scan` unrolled.

    XLA's cost analysis counts a while loop's body once whatever its trip count, so the scanned
    layer stack would look one layer deep. Costs are measured on unrolled 1- and 2-layer copies
    of the model instead and extrapolated (`layer_costs`).
    """
    scan = jax.lax.scan
    jax.lax.scan = partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan


def compiled_cost(compiled: Any) -> dict[str, float]:
    """XLA cost analysis (per chip) of a compiled step."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def compiled_seconds(compiled: Any) -> float | None:
    """The compiler's step-time estimate (seconds, per chip) of a compiled step, or None.

    libtpu sums a cost per instruction into "optimal_seconds" and counts -1 for each custom call
    it cannot cost; the `UNCOSTED_CUSTOM_CALLS` ones cost nothing, so their placeholders are taken
    back out. What stays negative holds other work it cannot cost (multi-slice programs always
    do), and there is no estimate.
    """
    seconds = float(compiled_cost(compiled).get("optimal_seconds", -1.0))
    text = compiled.as_text()
    seconds += sum(text.count(f'custom_call_target="{t}"') for t in UNCOSTED_CUSTOM_CALLS)
    return seconds if seconds > 0 else None


def layer_costs(
    compile_fn: Callable[..., Any], config: LlamaConfig, *args: Any
) -> tuple[float, float | None]:
    """(FLOPs per chip, estimated seconds) of the step for `config.n_layers` layers: the cost of
    an unrolled 1-layer model plus (L - 1) times the cost of one more layer.

    Seconds are None when the compiler has no estimate (`compiled_seconds`).
    """
    costs = []
    for n in (1, 2):
        with unrolled_scans():
            compiled = compile_fn(config.replace(n_layers=n), *args)
        costs.append((float(compiled_cost(compiled)["flops"]), compiled_seconds(compiled)))
    (f1, s1), (f2, s2) = costs
    extra = config.n_layers - 1
    seconds = s1 + extra * (s2 - s1) if s1 is not None and s2 is not None else None
    return f1 + extra * (f2 - f1), seconds


def model_flops(
    config: LlamaConfig, step: str, batch: int, seq: int, lora: LoraConfig | None = None
) -> tuple[float, int]:
    """(model FLOPs of one step, tokens it processes). Training uses `train.metrics`' count
    (LoRA's without the base's weight gradients); a decode token costs 2 * N_matmul plus
    attention over the `seq` cached keys."""
    if step == "train":
        return flops_per_token(config, seq, lora) * batch * seq, batch * seq
    attention = 4 * config.n_layers * config.n_heads * config.head_dim * seq
    return float(2 * config.matmul_params() + attention) * batch, batch


def run(
    preset_name: str,
    topology: str,
    *,
    mesh_spec: str | None = None,
    rules: str | None = None,
    step: str = "train",
    batch: int | None = None,
    seq: int = 4096,
    slices: int = 1,
    loss_chunks: int = LOSS_CHUNKS,
    kv: str = "contiguous",
    block_size: int = BLOCK_SIZE,
    kv_cache_dtype: str | None = None,
    quantize: str | None = None,
    overrides: dict[str, Any] | None = None,
    lora: LoraConfig | None = None,
) -> Report:
    rules = rules or ("fsdp" if step == "train" else "infer_tp")
    policy = {**RUN_POLICY, **({"param_dtype": "bfloat16"} if step == "decode" else {})}
    config = preset(preset_name, **{**policy, **(overrides or {})})
    chip = chip_of(topology)
    devices = topology_devices(topology, slices)
    mesh = make_mesh(mesh_spec or DEFAULT_MESH[rules], devices)
    batch = batch or len(devices)
    if step == "train":
        compile_fn = partial(compile_train, loss_chunks=loss_chunks, lora=lora)
    else:
        compile_fn = partial(
            compile_decode,
            kv=kv,
            block_size=block_size,
            kv_cache_dtype=kv_cache_dtype,
            quantize=quantize,
        )
    compiled = compile_fn(config, mesh, rules, batch, seq)
    memory = compiled.memory_analysis()
    compiler_flops, seconds = layer_costs(compile_fn, config, mesh, rules, batch, seq)
    per_chip = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    flops, tokens = model_flops(config, step, batch, seq, lora)
    n = len(devices)
    return Report(
        preset=preset_name,
        step=step,
        topology=topology if slices == 1 else f"{slices}x {topology}",
        chips=n,
        mesh={a: s for a, s in mesh.shape.items() if s > 1} or {"data": 1},
        rules=rules,
        batch=batch,
        seq=seq,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        per_chip_bytes=per_chip,
        hbm_bytes=chip.hbm_bytes,
        fits=per_chip <= chip.hbm_bytes,
        flops_per_step=flops,
        compiler_flops_per_chip=compiler_flops,
        cost_complete=compiler_flops * n >= flops,
        est_step_seconds=seconds,
        est_mfu=flops / (seconds * n * chip.peak_bf16_flops) if seconds else None,
        tokens_per_sec_per_chip=tokens / seconds / n if seconds else None,
        no_estimate=None
        if seconds
        else "libtpu's cost analysis gives multi-slice (DCN) programs no step time"
        if slices > 1
        else "libtpu's cost analysis left work it cannot cost (a negative step time)",
        kv=kv if step == "decode" else None,
        block_size=block_size if step == "decode" and kv == "paged" else None,
        kv_cache_dtype=kv_cache_dtype if step == "decode" else None,
        quantize=quantize if step == "decode" else None,
        lora=f"r={lora.rank} on {','.join(lora.targets)}" if lora and step == "train" else None,
    )


def format_report(r: Report) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    mesh = ",".join(f"{a}={s}" for a, s in r.mesh.items())
    paged = f", paged KV cache ({r.block_size}-token blocks)" if r.kv == "paged" else ""
    paged += f", {r.kv_cache_dtype} KV cache" if r.kv_cache_dtype else ""
    paged += f", {r.quantize} weights" if r.quantize else ""
    paged += f", LoRA {r.lora}" if r.lora else ""
    return "\n".join(
        [
            f"{r.preset} {r.step} step on {r.topology} ({r.chips} chips), mesh {mesh}, "
            f"rules {r.rules}, batch {r.batch} x seq {r.seq}{paged}",
            f"  per chip: arguments {gb(r.argument_bytes)} + temporaries {gb(r.temp_bytes)} "
            f"+ unaliased outputs {gb(r.output_bytes - r.alias_bytes)} = {gb(r.per_chip_bytes)} "
            f"of {gb(r.hbm_bytes)} HBM: {'fits' if r.fits else 'DOES NOT FIT'}",
            f"  FLOPs/step: model {r.flops_per_step:.3e}, compiler {r.compiler_flops_per_chip:.3e} "
            "per chip"
            + (
                ""
                if r.cost_complete
                else " (fewer than the model needs: some work goes uncounted, e.g. loops XLA "
                "generates count once, so the step-time estimate is a lower bound)"
            ),
            f"  est. step: no compiler estimate: {r.no_estimate}"
            if r.est_step_seconds is None
            else f"  est. step {r.est_step_seconds * 1e3:.1f} ms: MFU {r.est_mfu:.1%}, "
            f"{r.tokens_per_sec_per_chip:,.0f} tokens/s/chip",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sharding.aot", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, help="model preset, e.g. llama3.1-8b")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:2x2x1, v5e:4x4")
    p.add_argument("--slices", type=int, default=1, help="number of such slices over DCN")
    p.add_argument("--mesh", help="mesh spec (default: the rules preset's, e.g. fsdp=-1)")
    p.add_argument("--rules", choices=PRESET_NAMES, help="fsdp for train, infer_tp for decode")
    p.add_argument("--step", choices=("train", "decode"), default="train")
    p.add_argument("--batch", type=int, help="global batch (default: one per chip)")
    p.add_argument("--seq", type=int, default=4096, help="sequence / KV cache length")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="remat policy (default full)")
    p.add_argument("--compute-dtype", choices=DTYPES, help="matmul dtype (default bfloat16)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, help="override the attention kernel")
    p.add_argument(
        "--context-parallel",
        choices=CONTEXT_PARALLEL,
        help="train steps: attention over a sequence split on the sequence axis (default "
        "all_to_all: a heads split around the kernel; all_gather or ring: load-balanced)",
    )
    p.add_argument(
        "--loss-chunks",
        type=int,
        default=LOSS_CHUNKS,
        help="sequence slices the output head and loss run over (default %(default)s)",
    )
    p.add_argument(
        "--kv", choices=KV_LAYOUTS, default="contiguous", help="decode steps' KV cache layout"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=BLOCK_SIZE,
        help="tokens per block of a paged KV cache (default %(default)s)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", QUANTIZED),
        default="auto",
        help="decode steps' KV cache storage: auto (the compute dtype) or int8 with scales",
    )
    p.add_argument(
        "--quantize",
        choices=tuple(MODES),
        help="decode steps: int8 or fp8 (e4m3) projections and head, per-channel scales",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train steps: LoRA adapters of this rank over a frozen bf16 base (alpha 2 x rank)",
    )
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="projections LoRA adapts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    lora = None
    if args.lora_rank:
        lora = LoraConfig(args.lora_rank, 2.0 * args.lora_rank, parse_targets(args.lora_targets))
    fields = ("remat", "compute_dtype", "attention", "context_parallel")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k)}
    report = run(
        args.preset,
        args.topology,
        mesh_spec=args.mesh,
        rules=args.rules,
        step=args.step,
        batch=args.batch,
        seq=args.seq,
        slices=args.slices,
        loss_chunks=args.loss_chunks,
        kv=args.kv,
        block_size=args.block_size,
        kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        quantize=args.quantize,
        overrides=overrides,
        lora=lora,
    )
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
