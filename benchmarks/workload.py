"""What is measured: the four benchmark rows, their inputs, and the work each one does.

Both sides get the same inputs (drawn here from fixed seeds) and the same weights, so the
figures differ only by the stack that runs them. The work counts (FLOPs, bytes) are what the
physical limits are compared against: they count what the model needs, not what an
implementation happens to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # the reference's worker imports this module and must not pull in JAX
    from llama_jax.config import LlamaConfig

BENCH_PRESET = "bench-155m"
WEIGHT_SEED = 0
FLOAT32_BYTES = 4

Kind = Literal["decode", "prefill", "train"]


@dataclass(frozen=True)
class Row:
    """One benchmark row. `length` is the prompt length (decode) or sequence length."""

    name: str
    kind: Kind
    batch: int
    length: int
    new_tokens: int = 0
    iters: int = 5  # timed iterations per side (after warm-up)
    # Our side's weights quantized in this mode (`llama_jax.quantize`); the reference stays
    # float32, so the ratio shows what quantization buys against the same yardstick.
    quantize: str | None = None
    # Our side decodes speculatively with this draft (`--draft`, e.g. "self-int8"); greedy, so
    # its tokens stay the float32 model's and the reference is unchanged.
    draft: str | None = None

    @property
    def variant(self) -> str | None:
        """The suffix naming what this row changes against its float32 row, if anything."""
        return self.quantize or ("spec" if self.draft else None)

    @property
    def tokens(self) -> int:
        """Tokens one iteration produces (decode) or processes (prefill, train)."""
        return self.batch * (self.new_tokens if self.kind == "decode" else self.length)

    @property
    def context(self) -> int:
        """Cache length a decode needs: prompt plus generated tokens."""
        return self.length + self.new_tokens


ROWS: tuple[Row, ...] = (
    Row("decode_b1", "decode", batch=1, length=64, new_tokens=128),
    Row("decode_b8", "decode", batch=8, length=64, new_tokens=128),
    Row("decode_b1_int8", "decode", batch=1, length=64, new_tokens=128, quantize="int8"),
    Row("decode_b8_int8", "decode", batch=8, length=64, new_tokens=128, quantize="int8"),
    Row("decode_b1_spec", "decode", batch=1, length=64, new_tokens=128, draft="self-int8"),
    Row("decode_b8_spec", "decode", batch=8, length=64, new_tokens=128, draft="self-int8"),
    Row("prefill_512", "prefill", batch=1, length=512, iters=15),
    Row("train_b4x256", "train", batch=4, length=256),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def resolve_row(name: str, new_tokens: int = 0) -> Row:
    """The named row; `new_tokens` > 0 shortens a decode row (for quick smoke runs)."""
    row = ROWS_BY_NAME[name]
    if new_tokens and row.kind == "decode":
        row = dataclasses.replace(row, new_tokens=new_tokens)
    return row


# Targets: utilisation of the limits measured in the same run (host-independent, unlike the
# ratio to the reference, which is reported beside them); peak RSS must not exceed the reference's.
TARGETS: dict[str, dict[str, float]] = {
    "decode_b1": {"bandwidth_util": 0.85},
    "decode_b8": {"bandwidth_util": 0.75},
    "prefill_512": {"mfu": 0.75},
    "train_b4x256": {"mfu": 0.60},
}
# A quantized or speculative row's tokens/s over its float row's (ours, same run), at the least.
QUANTIZED_SPEEDUP_TARGETS: dict[str, float] = {"decode_b1_int8": 1.8, "decode_b1_spec": 1.0}
QUANTIZED_BYTES = 1  # one stored int8 / fp8 weight


def prompt_tokens(row: Row, vocab_size: int) -> np.ndarray:
    """int32 [batch, length] prompt (decode) or input (prefill) tokens."""
    rng = np.random.default_rng(1000 + row.batch * 7 + row.length)
    return rng.integers(0, vocab_size, (row.batch, row.length), dtype=np.int32)


def train_batch(row: Row, vocab_size: int) -> dict[str, np.ndarray]:
    """A full (unpacked, unpadded) language-modelling batch in the train-step layout."""
    rng = np.random.default_rng(2000 + row.batch * 7 + row.length)
    seq = rng.integers(0, vocab_size, (row.batch, row.length + 1), dtype=np.int32)
    shape = (row.batch, row.length)
    return {
        "tokens": seq[:, :-1],
        "targets": seq[:, 1:],
        "positions": np.broadcast_to(np.arange(row.length, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }


# --- work counts ----------------------------------------------------------------------------


def _attention_flops(config: LlamaConfig, batch: int, length: int) -> int:
    """Causal self-attention forward FLOPs (QK^T and PV), counting only the unmasked half."""
    per_layer = 2 * 2 * config.n_heads * config.head_dim * length * (length + 1) // 2
    return batch * config.n_layers * per_layer


def prefill_flops(config: LlamaConfig, row: Row) -> int:
    """Forward over the prompt with the output head applied to the last position only."""
    head = config.dim * config.vocab_size
    layers = config.matmul_params() - head
    return (
        2 * layers * row.batch * row.length
        + _attention_flops(config, row.batch, row.length)
        + 2 * head * row.batch
    )


def train_flops(config: LlamaConfig, row: Row) -> int:
    """Forward + backward (3x forward), the usual model-FLOPs count behind MFU."""
    forward = 2 * config.matmul_params() * row.tokens + _attention_flops(
        config, row.batch, row.length
    )
    return 3 * forward


def decode_step_bytes(config: LlamaConfig, row: Row, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Bytes one decode step must read from memory at the least, averaged over the row's steps.

    Every matmul weight (the output head too, tied or not) and every norm is read once per step.
    The embedding table is gathered: only `batch` rows of it are read. The KV cache read is what
    attention over the valid prefix needs. `dtype_bytes`: the size of one stored weight and
    cache entry (float32 in the CPU rows, bfloat16 in `benchmarks.gpu`); a quantized row's
    matmul weights take one byte each (their per-channel scales, under 1% more, not counted).
    """
    norms = config.dim * (2 * config.n_layers + 1)
    matmul_bytes = QUANTIZED_BYTES if row.quantize else dtype_bytes
    weights = config.matmul_params() * matmul_bytes + norms * dtype_bytes
    embedding_rows = row.batch * config.dim * dtype_bytes
    mean_context = row.length + row.new_tokens / 2
    kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes
    return weights + embedding_rows + int(row.batch * mean_context * kv)
