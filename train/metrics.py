"""Training metrics: the FLOP count behind MFU, peak device FLOP/s, and the three sinks
(console progress bar, TensorBoard event files, JSONL).

FLOPs per trained token (model FLOPs, so rematerialisation is not counted: this is MFU, not HFU):

    6 * N_matmul  +  6 * L * H * hd * T

N_matmul is `LlamaConfig.matmul_params()`, the weights that multiply activations: per layer the
q/k/v/o projections (d * hd * (2 H + 2 Hkv)) and the SwiGLU MLP (3 * d * ffn), plus the output
head (d * V, counted even when tied; the embedding lookup is a gather, not a matmul). 2 FLOPs
per multiply-add and a backward pass costing twice the forward give the 6. Attention scores (Q K^T) and values
(P V) cost 2 * 2 * T * H * hd per token per layer forward, times 3 for forward + backward, which
is 12 * L * H * hd * T, halved because a causal mask leaves half the (query, key) pairs.
Only non-padding tokens count, so padding shows up as lost MFU.

LoRA over a frozen base computes no weight gradients of the base, so its count is
4 * N_matmul (forward, and the gradient of the activations) plus the same attention term; the
adapters' own FLOPs (rank r: 6 * r * (in + out) per projection) are counted on top. A frozen
model run forward in the step (DPO's reference, a distillation teacher) adds its forward:
2 * N_matmul + 2 * L * H * hd * T of that model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.lora import LoraConfig, adapter_shapes

# Dense bf16 peak FLOP/s per device (chip), from vendor data sheets, by `device_kind`. The kinds
# are what the runtime reports, which is not the product name: v5p reports "TPU v5", v5e
# "TPU v5 lite", v6e "TPU v6 lite". The longest matching prefix wins.
PEAK_FLOPS = {
    "TPU v6 lite": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def flops_per_token(
    config: LlamaConfig,
    seq_len: int,
    lora: LoraConfig | None = None,
    frozen_forwards: Sequence[LlamaConfig] = (),
) -> float:
    """Training FLOPs per token: 6 * N_matmul + 6 * L * H * hd * T (causal attention); with
    `lora`, 4 * N_matmul + 6 * N_adapters + the same attention term; plus, for each frozen
    model the step runs forward (a DPO reference, a teacher), 2 * N_matmul + 2 * L * H * hd * T
    of that model."""
    attention = 6 * config.n_layers * config.n_heads * config.head_dim * seq_len
    if lora is None:
        total = 6 * config.matmul_params() + attention
    else:
        adapters = sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_shapes(config, lora)))
        total = 4 * config.matmul_params() + 6 * adapters + attention
    for other in frozen_forwards:
        total += (
            2 * other.matmul_params()
            + 2 * other.n_layers * other.n_heads * other.head_dim * seq_len
        )
    return float(total)


def measure_peak_flops(devices: Sequence[Any], dtype: str, size: int = 512) -> float:
    """Best matmul FLOP/s per device with every device busy at once (for hosts with no data
    sheet entry, e.g. CPUs, where emulated devices share the same cores)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    x = jax.device_put(
        jnp.ones((len(devices), size, size), dtype), NamedSharding(mesh, PartitionSpec("d"))
    )
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(
    devices: Sequence[Any], dtype: str, override_tflops: float
) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "config peak_tflops"
    kind = devices[0].device_kind
    matches = [prefix for prefix in PEAK_FLOPS if kind.startswith(prefix)]
    if matches:
        return PEAK_FLOPS[max(matches, key=len)], f"data sheet ({kind})"
    return measure_peak_flops(devices, dtype), f"measured {dtype} matmul on {kind}"


class MetricsLogger:
    """Writes per-step metrics to `metrics.jsonl` and TensorBoard, and a progress bar.

    `log` takes the metrics of consecutive steps fetched together, and the wall time they took;
    throughput fields are attached to the last of them.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        total_steps: int,
        start_step: int,
        flops_per_token: float,
        peak_flops: float,
        n_devices: int,
        enabled: bool = True,
    ):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.n_devices = n_devices
        self.enabled = enabled
        self.timed_tokens = self.timed_seconds = 0.0  # steps logged with a wall time
        self.jsonl = None
        self.tb = None
        if enabled and run_dir is not None:
            from tensorboardX import SummaryWriter

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            path = Path(run_dir) / "metrics.jsonl"
            drop_steps_after(path, start_step)
            self.jsonl = open(path, "a")  # noqa: SIM115
            # TensorBoard hides every earlier event at or past `purge_step`: the steps a resume
            # replays show once, from this run.
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step")

    def log(self, first_step: int, records: list[dict[str, float]], seconds: float | None) -> dict:
        """`records[i]` are the metrics of step `first_step + i` (1-based: updates done).
        `seconds` is their wall time, None when it includes compilation."""
        last = dict(records[-1])
        if seconds is not None and seconds > 0:
            tokens = sum(r["tokens"] for r in records)
            self.timed_tokens += tokens
            self.timed_seconds += seconds
            tps = tokens / seconds
            last["tokens_per_sec"] = tps
            last["tokens_per_sec_per_device"] = tps / self.n_devices
            last["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.n_devices)
            last["step_time"] = seconds / len(records)
        records = [*records[:-1], last]
        if self.enabled:
            for i, record in enumerate(records):
                self._write(first_step + i, record)
            if self.tb is not None:
                self.tb.flush()  # as the JSONL is: a kill -9 loses no logged step
            self.bar.update(len(records))
            self.bar.set_postfix_str(_postfix(last), refresh=True)
        return last

    def _write(self, step: int, record: dict[str, float]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for name, value in record.items():
                self.tb.add_scalar(f"train/{name}", value, step)

    def mean_tokens_per_sec(self) -> float | None:
        """Tokens per second over the steps logged with a wall time (compilation excluded)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else None

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def drop_steps_after(path: Path, step: int) -> None:
    """Keep only the rows of `path` (metrics.jsonl) up to `step`, the step a run resumes from:
    the steps logged after its last checkpoint are done again and logged anew. The file is
    replaced atomically, so an interruption here loses nothing."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _postfix(m: dict[str, float]) -> str:
    parts = [f"loss {m['loss']:.4f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}"]
    if "tokens_per_sec" in m:
        parts += [f"{m['tokens_per_sec']:.0f} tok/s", f"MFU {100 * m['mfu']:.1f}%"]
    return ", ".join(parts)
