"""Context parallelism: causal attention with the sequence split over devices, load-balanced.

Why: at long sequence lengths the default split (`all_to_all`: a sequence split regrouped into
a heads split around the kernel, see `llama_jax.splash`) needs whole sequences per device and
at most as many devices as KV heads. Here every device keeps its slice of the sequence and
attends over the keys of the others: "all_gather" gathers K and V over the `sequence` mesh
axis (simple, keys O(T) per device), "ring" passes them around the devices with
`jax.lax.ppermute`, one neighbour's slice per step (keys O(T / S) per device in the forward
pass; the backward pass keeps each step's slice, as autodiff of the ring does).

Load balance: with a causal mask a device holding the end of the sequence has far more
unmasked (query, key) pairs than one holding the start. The sequence is cut into 2S chunks and
device i holds chunks i and 2S-1-i (zig-zag), so every device computes the same number of
chunk-pair blocks (`computed_pairs`). The permutation is applied inside attention only: q, k,
v and the segment ids are moved into the zig-zag layout after rotary embeddings (so positions
are the true ones) and the output is moved back, so the rest of the model, the data and the
loss see the ordinary contiguous split. It costs two neighbour exchanges per tensor each way.

Each block is `block_attention` in plain XLA (any backend; TPUs included: the splash kernel
does not return the log-sum-exp the blocks are merged with): flash-style tiles of keys, an
online softmax and a custom VJP that recomputes the scores, so no [time, time] matrix exists.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from llama_jax.partitioning import BATCH, HEADS, KV_HEADS, LENGTH, sharding_for

MODES = ("all_gather", "ring")
# A block's scores exist [QUERY_TILE, KEY_TILE] at a time (per batch row and head).
QUERY_TILE = 2048
KEY_TILE = 512
NEG = np.float32(-1e30)  # the log-sum-exp of a row with no key to attend to (finite: no NaNs)

AxisName = str | tuple[str, ...] | None


# --- one block: queries against keys, returning the output and its log-sum-exp -------------


def _scores(q, k, q_info, k_info):
    """Scaled scores [b, kv, g, tq, tk] (float32) and the mask, for grouped q
    [b, tq, kv, g, hd] and k [b, tk, kv, hd]; `*_info` = (token index, segment id), [b, t]."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    s = s * np.float32(1.0 / math.sqrt(q.shape[-1]))
    (qi, qs), (ki, ks) = q_info, k_info
    mask = (qi[:, :, None] >= ki[:, None, :]) & (qs[:, :, None] == ks[:, None, :])
    return s, mask[:, None, None]


def _tiles(x: jax.Array, tile: int) -> jax.Array:
    """[b, t, ...] -> [t / tile, b, tile, ...]: the scan axis first."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // tile, tile, *x.shape[2:]), 1, 0)


def _untile(x: jax.Array) -> jax.Array:
    n, b, tile = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * tile, *x.shape[3:])


def _scan_tiles(step, init, xs):
    """`lax.scan`'s contract (`step(carry, x) -> (carry, y)` over the leading axis of `xs`)
    as a `while_loop`; a single tile is one direct call.

    Why not `lax.scan`: under `remat`, transposing a layer partially evaluates this custom
    VJP's backward pass, and a scan there is split in two, its index-only values (every tile's
    mask) stacked as residuals: [T/S, T/S] per head, 87 GB per chip for one layer of
    llama3.1-8b at 131072 tokens over sequence=4. A while loop is never split. These loops are
    never differentiated (the custom VJP is the derivative)."""
    n = xs[0].shape[0]
    first = jax.tree.map(lambda x: x[0], xs)
    if n == 1:
        carry, out = step(init, first)
        return carry, jax.tree.map(lambda x: x[None], out)
    out_shapes = jax.eval_shape(lambda: step(init, first)[1])
    outs = jax.tree.map(lambda o: jnp.zeros((n, *o.shape), o.dtype), out_shapes)

    def body(state):
        i, carry, outs = state
        carry, out = step(carry, jax.tree.map(lambda x: x[i], xs))
        outs = jax.tree.map(lambda acc, o: acc.at[i].set(o), outs, out)
        return i + 1, carry, outs

    _, carry, outs = jax.lax.while_loop(lambda s: s[0] < n, body, (0, init, outs))
    return carry, outs


def _tile(t: int, tile: int) -> int:
    return math.gcd(t, tile)


def _forward_tile(q, k, v, q_info, k_info):
    """One query tile's (out float32 [b, tq, kv, g, hd], lse [b, tq, kv, g]): an online
    softmax over the key tiles."""
    b, tq, kvh, g, hd = q.shape

    def step(carry, kt):
        m, total, acc = carry
        k_t, v_t, ki, ks = kt
        s, mask = _scores(q, k_t, q_info, (ki, ks))
        s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_t.dtype), v_t)
        return (m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv), None

    init = (
        jnp.full((b, kvh, g, tq), NEG),
        jnp.zeros((b, kvh, g, tq), jnp.float32),
        jnp.zeros((b, kvh, g, tq, hd), jnp.float32),
    )
    xs = tuple(_tiles(x, _tile(k.shape[1], KEY_TILE)) for x in (k, v, *k_info))
    (m, total, acc), _ = _scan_tiles(step, init, xs)
    total_or_tiny = jnp.maximum(total, np.float32(1e-30))
    out = acc / total_or_tiny[..., None]
    lse = jnp.where(total > 0, m + jnp.log(total_or_tiny), NEG)
    return out.transpose(0, 3, 1, 2, 4), lse.transpose(0, 3, 1, 2)


def _backward_tile(q, k, v, q_info, k_info, out, lse, d_out, d_lse):
    """One query tile's share of flash attention's backward pass, key tile by key tile: the
    scores recomputed from the saved log-sum-exp; the lse's own cotangent (blocks are merged
    through it) adds `p * dlse`. Returns (dq, dk, dv), float32."""
    to_heads_first = (0, 2, 3, 1, 4)  # [b, t, kv, g, hd] -> [b, kv, g, t, hd]
    d_out = d_out.transpose(to_heads_first)
    delta = jnp.sum(d_out * out.transpose(to_heads_first), -1)  # [b, kv, g, tq]
    d_lse, lse = d_lse.transpose(0, 2, 3, 1), lse.transpose(0, 2, 3, 1)
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))

    def step(dq, kt):
        k_t, v_t, ki, ks = kt
        s, mask = _scores(q, k_t, q_info, (ki, ks))
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgqs,bkgqd->bskd", p, d_out)
        dp = jnp.einsum("bkgqd,bskd->bkgqs", d_out, v_t.astype(jnp.float32))
        ds = p * (dp - delta[..., None] + d_lse[..., None]) * scale
        dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_t.astype(jnp.float32))
        dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    xs = tuple(_tiles(x, _tile(k.shape[1], KEY_TILE)) for x in (k, v, *k_info))
    dq, (dk, dv) = _scan_tiles(step, jnp.zeros(q.shape, jnp.float32), xs)
    return dq, _untile(dk), _untile(dv)


def _forward(q, k, v, q_info, k_info):
    """(out float32 [b, tq, kv, g, hd], lse [b, tq, kv, g]) of grouped q over k and v, query
    tile by query tile: scores are [QUERY_TILE, KEY_TILE] at a time."""
    tile = _tile(q.shape[1], QUERY_TILE)
    per_tile = lambda _, x: (None, _forward_tile(x[0], k, v, x[1:], k_info))  # noqa: E731
    _, (out, lse) = _scan_tiles(per_tile, None, tuple(_tiles(x, tile) for x in (q, *q_info)))
    return _untile(out), _untile(lse)


@jax.custom_vjp
def _grouped_block(q, k, v, info):
    return _forward(q, k, v, *info)


def _grouped_block_fwd(q, k, v, info):
    out, lse = _forward(q, k, v, *info)
    return (out, lse), (q, k, v, info, out, lse)


def _grouped_block_bwd(res, grads):
    """The backward pass query tile by query tile (`_backward_tile`), dk and dv summed."""
    q, k, v, (q_info, k_info), out, lse = res
    tile = _tile(q.shape[1], QUERY_TILE)

    def per_tile(dkv, x):
        dq, dk, dv = _backward_tile(x[0], k, v, x[1:3], k_info, *x[3:])
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    xs = tuple(_tiles(x, tile) for x in (q, *q_info, out, lse, *grads))
    (dk, dv), dq = _scan_tiles(per_tile, zeros, xs)
    return _untile(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_grouped_block.defvjp(_grouped_block_fwd, _grouped_block_bwd)


def block_attention(q, k, v, q_info, k_info):
    """Causal, document-masked attention of q [b, tq, heads, hd] over k, v [b, tk, kv, hd]:
    (out float32 [b, tq, heads, hd], lse float32 [b, tq, heads]). `*_info` are (token index,
    segment id) pairs, int32 [b, t]: a query sees keys at or before its index in its segment.
    A query with no such key gets out 0 and lse `NEG`."""
    b, tq, h, hd = q.shape
    kvh = k.shape[2]
    grouped = q.reshape(b, tq, kvh, h // kvh, hd)
    out, lse = _grouped_block(grouped, k, v, (q_info, k_info))
    return out.reshape(b, tq, h, hd), lse.reshape(b, tq, h)


def merge(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
    """Two blocks' (out, lse) over disjoint keys -> those of attention over all their keys."""
    (oa, la), (ob, lb) = a, b
    lse = jnp.logaddexp(la, lb)
    wa, wb = jnp.exp(la - lse)[..., None], jnp.exp(lb - lse)[..., None]
    return oa * wa + ob * wb, lse


# --- the zig-zag layout and the ring schedule ------------------------------------------------


def zigzag_chunks(device, shards: int):
    """The global chunk indices (of 2 * shards) device `device` holds in the zig-zag layout."""
    return device, 2 * shards - 1 - device


def contiguous_chunks(device, shards: int):
    """The chunks the plain contiguous split gives device `device`."""
    return 2 * device, 2 * device + 1


def computed_pairs(device: int, shards: int) -> list[tuple[int, int]]:
    """(query chunk, key chunk) blocks device `device` computes over the ring's steps: all four
    local pairs at step 0 (two on the diagonal, one masked), then two per step, chosen by
    `_step_pairs` exactly as `attention` chooses them."""
    q0, q1 = zigzag_chunks(device, shards)
    pairs = [(q0, q0), (q0, q1), (q1, q0), (q1, q1)]
    for step in range(1, shards):
        source = (device - step) % shards
        k0, k1 = zigzag_chunks(source, shards)
        earlier = _source_is_earlier(device, source)
        pairs += [(q1, k0), (q0, k0) if earlier else (q1, k1)]
    return pairs


def needed_pairs(chunks: tuple[int, int]) -> int:
    """(query chunk, key chunk) blocks a device holding `chunks` must compute under a causal
    mask: every key chunk at or before each of its query chunks."""
    return sum(c + 1 for c in chunks)


def _source_is_earlier(device, source):
    """Whether the keys from `source` (zig-zag) all precede this device's first chunk: then
    both local query chunks need the source's first key chunk; otherwise the second local
    query chunk needs both of the source's key chunks. Either way two full blocks."""
    return source < device


def _to_zigzag(x: jax.Array, axis: AxisName, shards: int) -> jax.Array:
    """A device's contiguous slice [b, 2C, ...] (chunks 2i, 2i+1) -> its zig-zag chunks
    (i, 2S-1-i): each chunk travels to its device in one of two neighbour exchanges."""
    if shards == 1:
        return x
    dest = lambda j: j if j < shards else 2 * shards - 1 - j  # noqa: E731
    c = x.shape[1] // 2
    even = jax.lax.ppermute(x[:, :c], axis, [(i, dest(2 * i)) for i in range(shards)])
    odd = jax.lax.ppermute(x[:, c:], axis, [(i, dest(2 * i + 1)) for i in range(shards)])
    first_is_even = jax.lax.axis_index(axis) % 2 == 0
    return jnp.where(
        first_is_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1)
    )


def _from_zigzag(x: jax.Array, axis: AxisName, shards: int) -> jax.Array:
    """The inverse of `_to_zigzag`."""
    if shards == 1:
        return x
    dest = lambda j: j if j < shards else 2 * shards - 1 - j  # noqa: E731
    c = x.shape[1] // 2
    first_is_even = jax.lax.axis_index(axis) % 2 == 0
    a, b = x[:, :c], x[:, c:]
    even_chunk = jnp.where(first_is_even, a, b)
    odd_chunk = jnp.where(first_is_even, b, a)
    even = jax.lax.ppermute(even_chunk, axis, [(dest(2 * i), i) for i in range(shards)])
    odd = jax.lax.ppermute(odd_chunk, axis, [(dest(2 * i + 1), i) for i in range(shards)])
    return jnp.concatenate([even, odd], 1)


def _chunk_index(chunks: tuple, c: int, b: int) -> jax.Array:
    """Token indices [b, 2C] of a device's two chunks."""
    idx = jnp.concatenate([chunk * c + jnp.arange(c, dtype=jnp.int32) for chunk in chunks])
    return jnp.broadcast_to(idx, (b, 2 * c))


def _two_blocks(x: jax.Array, half: int, earlier: jax.Array) -> jax.Array:
    """A ring step's two blocks stacked on the batch axis, from a device's two chunks of `x`
    [b, 2C, ...]: block A takes chunk `half`; block B the first chunk if the keys come from an
    `earlier` device, else the second. With queries (half 1) and keys (half 0) that is
    A = (q1, k0) and B = (q0, k0) or (q1, k1): the two unmasked blocks of the step."""
    c = x.shape[1] // 2
    chunks = (x[:, :c], x[:, c:])
    return jnp.concatenate([chunks[half], jnp.where(earlier, chunks[0], chunks[1])], 0)


def _per_device(q, k, v, seg, *, mode: str, axis: AxisName, shards: int):
    """One device's attention: its zig-zag queries against every device's zig-zag keys. The
    ring's steps after the first are a `lax.scan` (one compiled body whatever the ring's size)."""
    b, t_local = q.shape[:2]
    c = t_local // 2
    device = jax.lax.axis_index(axis) if shards > 1 else 0
    q, k, v, seg = (_to_zigzag(x, axis, shards) for x in (q, k, v, seg))
    q_idx = _chunk_index(zigzag_chunks(device, shards), c, b)
    # step 0: the local blocks; the running (out, lse) of each of the two query chunks
    out, lse = block_attention(q, k, v, (q_idx, seg), (q_idx, seg))
    slots = ((out[:, :c], lse[:, :c]), (out[:, c:], lse[:, c:]))
    gathered = [jax.lax.all_gather(x, axis) for x in (k, v, seg)] if mode == "all_gather" else []

    def ring_step(carry, step):
        kv, (first, second) = carry
        source = (device - step) % shards
        if mode == "ring":
            ring = [(i, (i + 1) % shards) for i in range(shards)]
            kv = tuple(jax.lax.ppermute(x, axis, ring) for x in kv)
        else:
            kv = tuple(jax.lax.dynamic_index_in_dim(x, source, 0, keepdims=False) for x in gathered)
        k_idx = _chunk_index(zigzag_chunks(source, shards), c, b)
        earlier = _source_is_earlier(device, source)
        queries = [_two_blocks(x, 1, earlier) for x in (q, q_idx, seg)]
        k_s, v_s, k_idx_s, seg_s = (_two_blocks(x, 0, earlier) for x in (*kv[:2], k_idx, kv[2]))
        o, l_ = block_attention(queries[0], k_s, v_s, tuple(queries[1:]), (k_idx_s, seg_s))
        second = merge(second, (o[:b], l_[:b]))  # block A: the second query chunk
        target = jax.tree.map(partial(jnp.where, earlier), first, second)  # block B's chunk
        merged = merge(target, (o[b:], l_[b:]))
        first = jax.tree.map(partial(jnp.where, earlier), merged, first)
        second = jax.tree.map(partial(jnp.where, earlier), second, merged)
        return (kv, (first, second)), None

    if shards > 1:
        steps = jnp.arange(1, shards, dtype=jnp.int32)
        (_, slots), _ = jax.lax.scan(ring_step, ((k, v, seg), slots), steps)
    out = jnp.concatenate([slots[0][0], slots[1][0]], 1).astype(q.dtype)
    return _from_zigzag(out, axis, shards)


def _axis_size(mesh: jax.sharding.Mesh, axis: AxisName) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    return math.prod(mesh.shape[a] for a in names)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, mode: str
) -> jax.Array:
    """Causal attention, packed documents kept apart, with the sequence split over the mesh
    axes of `activation_length` (the `sequence` axis): q [batch, time, heads, head_dim],
    k and v [batch, time, kv_heads, head_dim] -> [batch, time, heads, head_dim]. `mode` is
    "all_gather" or "ring". Without a sharding resolver it runs on one device (one shard)."""
    if mode not in MODES:
        raise ValueError(f"context_parallel mode must be one of {MODES}, got {mode!r}")
    b, t = q.shape[:2]
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q_sharding = sharding_for((BATCH, LENGTH, HEADS, None))
    if not isinstance(q_sharding, NamedSharding):
        if t % 2:
            raise ValueError(f"context_parallel={mode!r}: sequence length {t} must be even")
        return _per_device(q, k, v, seg, mode=mode, axis=None, shards=1)
    mesh, q_spec = q_sharding.mesh, q_sharding.spec
    kv_spec = sharding_for((BATCH, LENGTH, KV_HEADS, None)).spec
    seg_spec = sharding_for((BATCH, LENGTH)).spec
    axis = q_spec[1] if len(q_spec) > 1 else None
    shards = _axis_size(mesh, axis)
    if t % (2 * shards):
        raise ValueError(
            f"context_parallel={mode!r}: sequence length {t} must be a multiple of "
            f"2 x {shards} (two chunks per device of the sequence axis)"
        )
    mapped = jax.shard_map(
        partial(_per_device, mode=mode, axis=axis, shards=shards),
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return mapped(q, k, v, seg)


def kernel(mode: str):
    """`attention` in `mode`, as the model's kernel table calls kernels: (q, k, v, ids)."""
    return partial(attention, mode=mode)
