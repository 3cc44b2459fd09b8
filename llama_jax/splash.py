"""Causal attention through the Pallas splash-attention kernel (TPU).

Why: plain attention materialises one layer's [batch, heads, time, time] scores in float32 (for
Llama 3.1-8B at 4096 tokens that is 2 GiB per sequence, several times over during the backward
pass). The kernel works block by block and keeps only a per-row log-sum-exp, so attention
memory is linear in the sequence length. Its backward pass is a kernel too.

The kernel runs per device, so under a sharding resolver it is wrapped in a `shard_map`: batch
split as the activations are, heads split over the `activation_attention_heads` rule. When the
sequence is split over devices (context parallelism), entering the map regroups q, k and v from
"a slice of the sequence, all heads" to "all of the sequence, a slice of the heads" (one
all-to-all), so each device attends over whole sequences with no redundant work.

Off TPU the kernel runs in Pallas' interpreter: slow, but it lets tests check the numerics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.partitioning import ATTENTION_HEADS as HEADS
from llama_jax.partitioning import BATCH, sharding_for, traced_device

BLOCK = 512  # tile edge (tokens) of the kernel's q and kv blocks
MIN_BLOCK = 128  # the kernel's smallest tile: sequences must be a multiple of it


def suits(time: int, head_dim: int) -> bool:
    """Whether `attention="auto"` should take the kernel for these shapes."""
    return time % MIN_BLOCK == 0 and head_dim % 128 == 0


def on_tpu() -> bool:
    """Whether traced code will run on TPUs: the active mesh's devices, else the default backend."""
    return traced_device().platform == "tpu"


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None
) -> jax.Array:
    """Causal attention, packed documents kept apart: q [batch, time, heads, head_dim],
    k and v [batch, time, kv_heads, head_dim] -> [batch, time, heads, head_dim]."""
    t, hd = q.shape[1], q.shape[3]
    if t % MIN_BLOCK:
        raise ValueError(
            f"attention='splash' needs a sequence length divisible by {MIN_BLOCK}, got {t}"
        )
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)  # the kernel does not scale the scores
    interpret = not on_tpu()

    def per_device(q, k, v, segment_ids):
        heads = q.shape[2]
        block = math.gcd(t, BLOCK)
        kernel = splash.make_splash_mha(
            masks.MultiHeadMask([masks.CausalMask((t, t))] * heads),
            block_sizes=splash.BlockSizes(
                block_q=block,
                block_kv=block,
                block_kv_compute=block,
                block_q_dkv=block,
                block_kv_dkv=block,
                block_kv_dkv_compute=block,
                block_q_dq=block,
                block_kv_dq=block,
            ),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        ids = None if segment_ids is None else splash.SegmentIds(segment_ids, segment_ids)
        heads_first = (0, 2, 1, 3)  # the kernel takes [heads, time, head_dim] per sequence
        out = jax.vmap(kernel)(
            q.transpose(heads_first), k.transpose(heads_first), v.transpose(heads_first), ids
        )
        return out.transpose(heads_first)

    sharding = sharding_for((BATCH, None, HEADS, None))
    if not isinstance(sharding, NamedSharding):
        return per_device(q, k, v, segment_ids)
    spec = sharding.spec
    _check_divides(spec, sharding.mesh, q.shape, k.shape)
    batch_spec = PartitionSpec(*spec[:1])
    mapped = jax.shard_map(
        per_device,
        mesh=sharding.mesh,
        in_specs=(spec, spec, spec, None if segment_ids is None else batch_spec),
        out_specs=spec,
        check_vma=False,
    )
    return mapped(q, k, v, segment_ids)


def _check_divides(
    spec: PartitionSpec, mesh: jax.sharding.Mesh, q_shape: tuple, kv_shape: tuple
) -> None:
    """A clear error, instead of shard_map's, when heads or batch do not split evenly."""
    for dim, what in ((0, "batch"), (2, "heads")):
        axes = spec[dim] if dim < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.shape[a] for a in axes)
        for shape, name in ((q_shape, "query"), (kv_shape, "key/value")):
            if shape[dim] % n:
                raise ValueError(
                    f"attention='splash': {name} {what} ({shape[dim]}) does not divide over "
                    f"mesh axes {'*'.join(axes)}={n}"
                )
