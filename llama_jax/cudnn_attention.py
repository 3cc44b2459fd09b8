"""Causal attention through cuDNN's fused flash-attention kernel (NVIDIA GPUs).

Why: as with the splash kernel on TPU, plain attention materialises one layer's
[batch, heads, time, time] float32 scores; cuDNN's kernel works block by block, skips the blocks
above the causal diagonal and keeps only a per-row log-sum-exp, and its backward pass is a
kernel too. It is reached through `jax.nn.dot_product_attention(implementation="cudnn")`.

What that call can express, and so what this module uses:
- causal attention (`is_causal`), with grouped KV heads natively (fewer key/value heads than
  query heads: no repeat of k and v);
- packed documents, as a boolean [batch, 1, time, time] mask (causal within each document),
  which cuDNN applies as an additive bias with no gradient. The call's other options do not
  cover packing: `query_seq_lengths` / `key_value_seq_lengths` describe one document per row
  plus right padding, and cuDNN's packed layout (`q_offsets` / `kv_offsets`) is reachable only
  through JAX's private `jax._src.cudnn` module, with the number of documents per row fixed at
  trace time. The mask costs cuDNN reads of a [time, time] bias per layer, small beside the
  heads * head_dim multiply-adds attention does per element of it.
What it cannot express, where `attention="auto"` takes the XLA path instead (`suits`): float32
(cuDNN takes float16 and bfloat16 only), head dims above 128 or not a multiple of 8 (Hopper
allows 256; 128 holds on every GPU cuDNN serves), odd lengths (the masked backward needs even
ones), GPUs before Ampere. The cached path (decode, and the engine's prefill into its cache)
stays XLA: its keys are cache slots at per-row offsets, which this call has no form for.

Sharding: JAX's cuDNN call partitions itself over batch and heads (its custom partitioning
rule refuses a split sequence or head_dim, and wants q, k and v split alike). q, k and v are
therefore constrained to the splash kernel's layout, batch as the activations and heads over
`activation_attention_heads`, so a sequence split becomes a heads split (one all-to-all each
way, as for splash) and plain jit partitioning does the rest: unlike splash, no shard_map.
"""

from __future__ import annotations

import re

import jax

from llama_jax.partitioning import ATTENTION_HEADS as HEADS
from llama_jax.partitioning import BATCH, constrain, traced_device

HALF_DTYPES = ("bfloat16", "float16")  # all cuDNN attention takes
MAX_HEAD_DIM = 128
MIN_COMPUTE_CAPABILITY = (8, 0)  # flash attention in cuDNN: Ampere and later


def unsuited(time: int, head_dim: int, dtype: str) -> str | None:
    """Why cuDNN cannot take attention of these shapes and dtype; None when it can."""
    if dtype not in HALF_DTYPES:
        return f"cuDNN attention needs {' or '.join(HALF_DTYPES)} compute, got {dtype}"
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return (
            f"cuDNN attention needs a head_dim <= {MAX_HEAD_DIM}, a multiple of 8; got {head_dim}"
        )
    if time % 2:
        return f"cuDNN attention needs an even sequence length (its masked backward), got {time}"
    return None


def suits(time: int, head_dim: int, dtype: str) -> bool:
    """Whether `attention="auto"` should take the kernel for these shapes and dtype."""
    return unsuited(time, head_dim, dtype) is None


def on_gpu() -> bool:
    """Whether traced code will run on NVIDIA GPUs that cuDNN's flash attention serves."""
    device = traced_device()
    capability = getattr(device, "compute_capability", "") if device.platform == "gpu" else ""
    found = re.fullmatch(r"(\d+)\.(\d+)", str(capability))  # ROCm names its GPUs "gfx..."
    return found is not None and tuple(map(int, found.groups())) >= MIN_COMPUTE_CAPABILITY


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    implementation: str = "cudnn",
) -> jax.Array:
    """Causal attention, packed documents kept apart: q [batch, time, heads, head_dim],
    k and v [batch, time, kv_heads, head_dim] -> [batch, time, heads, head_dim].

    `implementation="xla"` makes the same `jax.nn.dot_product_attention` call run anywhere, so
    tests check on CPU the arguments the GPU gets.
    """
    if implementation == "cudnn":
        reason = unsuited(q.shape[1], q.shape[3], q.dtype.name)
        if reason:
            raise ValueError(f"attention='cudnn': {reason}")
    layout = (BATCH, None, HEADS, None)
    q, k, v = (constrain(x, layout) for x in (q, k, v))
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=implementation
    )
