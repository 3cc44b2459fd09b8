"""The Llama 3.x transformer in Flax NNX, pure at the jit boundary.

`Transformer` owns parameters (each tagged with logical axis names for the sharding rules); the
layer stack is stored stacked along a leading `layers` axis and run by `run_layers`, a
`jax.lax.scan`, so compile time does not grow with depth. Outside code works with plain nested
dicts of arrays ("params", the `nnx.split` state as a pure dict) and calls the pure function
`forward`. Weights are cast to the compute dtype once per layer (`cast_for_compute`), inside
the rematerialised layer function; the modules' matmuls use them as they come.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import context_parallel, cudnn_attention, kv_cache, paged_attention, splash
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache, PagedKVCache, QuantizedKV, Stored
from llama_jax.partitioning import BATCH, EMBED, HEADS, KV_HEADS, LENGTH, MLP, VOCAB, constrain
from llama_jax.quantize import Quantized, is_quantized, quantized_dense
from llama_jax.rope import apply_rotary, rotary_tables

Params = dict[str, Any]

INIT_STD = 0.02


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype))
    return nnx.Param(value, logical_axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.dtype(dtype)), logical_axes=axes)


def cast_for_compute(w: jax.Array | Quantized, dtype: jnp.dtype) -> jax.Array | Quantized:
    """`w.astype(dtype)`; float32 -> bfloat16 goes through `_bf16_rounded`. A `Quantized`
    weight stays as stored: `dense` converts its values inside the product."""
    if is_quantized(w):
        return w
    if w.dtype == jnp.float32 and dtype == jnp.bfloat16:
        return _bf16_rounded(w)
    return w.astype(dtype)


@jax.custom_vjp
def _bf16_rounded(w: jax.Array) -> jax.Array:
    """float32 -> bfloat16 as integer rounding on the bits (gradient: back to float32).

    Why: XLA's TPU compiler moves a plain `convert` of a layer's weights out of the layer loop,
    converting every layer at once; that copy then lives through the forward and backward
    passes (for Llama 3.1-8B on 4 chips, more memory than any activation). Integer
    ops on the bits are not moved, so one layer is converted at a time. The result is the same
    round-to-nearest-even as `astype`; NaNs stay NaN.
    """
    bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
    bits = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))  # round to nearest even
    rounded = jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(jnp.isnan(w), jnp.bfloat16(jnp.nan), rounded)


_bf16_rounded.defvjp(lambda w: (_bf16_rounded(w), None), lambda _, g: (g.astype(jnp.float32),))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back, as Meta and HF do."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array | Quantized, contract: int = 1) -> jax.Array:
    """`x [..., *c]` times `w [*c, *out]` (x's last `contract` axes with w's first), computed
    as one 2-D matmul: `[batch * time, c] @ [c, out]`. A `Quantized` weight goes through
    `llama_jax.quantize.quantized_dense`.

    Why not `einsum("btd,df->btf")`: its weight gradient contracts two axes (batch and time),
    and XLA's CPU backend first transposes the incoming gradient to merge them; for the output
    head that is a copy of the whole [tokens, vocab] gradient per step. With the leading axes
    flattened every matmul and its gradients are plain 2-D.
    """
    if is_quantized(w):
        return quantized_dense(x, w, contract)
    lead, inner = x.shape[: x.ndim - contract], w.shape[:contract]
    k = math.prod(inner)
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *w.shape[contract:])


class Adapters(NamedTuple):
    """Low-rank adapters added to the layer stack's projections in a forward pass:
    `W x + scale * B(A(dropout(x)))` for every projection `weights` holds (see `llama_jax.lora`,
    which builds, places, merges and stores them).

    `weights` mirrors the params' `layers` subtree: `{"attention": {"wq": {"a": [L, *in, r],
    "b": [L, r, *out]}}, "feed_forward": {...}}` for the adapted projections only. Dropout (on
    the adapter's input, as PEFT applies it) needs `rng`; without one it is off.
    """

    weights: Params
    scale: float
    dropout: float = 0.0
    rng: jax.Array | None = None


class LayerAdapters(NamedTuple):
    """One layer's slice of `Adapters`, already in the compute dtype, as the modules use it."""

    weights: Params
    scale: float
    dropout: float
    rng: jax.Array | None

    def project(self, x: jax.Array, w: jax.Array, module: str, name: str, contract: int = 1):
        """`dense(x, w, contract)` plus this projection's adapter, if it has one."""
        y = dense(x, w, contract)
        ab = self.weights.get(module, {}).get(name)
        if ab is None:
            return y
        if self.dropout > 0 and self.rng is not None:
            key = jax.random.fold_in(self.rng, _ADAPTED.index((module, name)))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        low = dense(x, ab["a"], contract)
        return y + (dense(low, ab["b"]) * self.scale).astype(y.dtype)


# Every projection an adapter may sit on, as (module, weight) in the layer's tree.
_ADAPTED = (
    ("attention", "wq"),
    ("attention", "wk"),
    ("attention", "wv"),
    ("attention", "wo"),
    ("feed_forward", "w1"),
    ("feed_forward", "w3"),
    ("feed_forward", "w2"),
)
NO_ADAPTERS = LayerAdapters({}, 0.0, 0.0, None)


class LayerCache(NamedTuple):
    """The stacked KV cache seen from one layer: which layer, and where this call's tokens go.

    The layer writes only its new tokens into the stacked arrays (a scatter at `layer`, `rows`,
    `slots`) and then reads its slice. Slicing the layer out first and writing the whole slice
    back moved the full slice per layer per step, and with per-layer weights XLA:CPU copied the
    whole stacked cache several times per layer. An int8 cache (`QuantizedKV`) is written
    quantized and read as int8 values and scales (see `llama_jax.kv_cache`).
    """

    k: Stored  # [layers, batch, max_len, kv_heads, head_dim], or a paged pool
    v: Stored  # [layers, kv_heads, blocks, block_size, head_dim]
    layer: jax.Array | int
    rows: jax.Array  # [batch, 1], or with a pool each new token's block [batch, time]
    slots: jax.Array  # [batch, time]: each new token's slot in its row or block
    table: jax.Array | None = None  # with a pool: [batch, width] blocks each row reads

    def write_index(self) -> tuple:
        """Where this call's new tokens [batch, time, kv_heads, head_dim] go in k and v."""
        if self.table is None:
            if isinstance(self.k, QuantizedKV):
                # int8 rows index the heads too (one head_dim row, one scale per token and
                # head): with [kv_heads] scale windows, XLA:TPU copied the whole int8 cache
                # in every layer (llama3.1-8b decode, 4 x 4096 on v5p: 0.81 GB of temporaries
                # per chip and 5.9 ms per step, against 0.01 GB and 0.4 ms)
                heads = jnp.arange(self.k.shape[3], dtype=jnp.int32)
                return (self.layer, self.rows[..., None], self.slots[..., None], heads)
            return (self.layer, self.rows, self.slots)
        # heads-first pool: the heads are indexed too (each new token writes one head_dim row
        # per head), so the scatter's window is the minor axis and the pool keeps the plain
        # layout the paged-attention kernel reads; a [kv_heads, head_dim] window made XLA lay
        # the pool out blocks-first and copy it for the kernel in every layer
        heads = jnp.arange(self.k.shape[1], dtype=jnp.int32)
        return (self.layer, heads, self.rows[..., None], self.slots[..., None])

    def write(self, k: jax.Array, v: jax.Array) -> LayerCache:
        """This call's new keys and values [batch, time, kv_heads, head_dim] written."""
        at = self.write_index()
        return self._replace(k=kv_cache.write(self.k, at, k), v=kv_cache.write(self.v, at, v))

    def keys_values(self) -> tuple[Stored, Stored]:
        """This layer's keys and values per row, [batch, keys, kv_heads, head_dim]: the row
        itself, or the row's blocks gathered from the pool in order. An int8 cache's stay
        int8 with their scales [batch, keys, kv_heads]: attention applies the scales to its
        scores and probabilities (`grouped_attention`), so no dequantized copy is made."""
        if self.table is None:
            read = lambda x: x[self.layer]  # noqa: E731
        else:
            b = self.table.shape[0]

            def read(x: jax.Array) -> jax.Array:
                # [batch, width, kv_heads, block_size, hd] (a scale: without hd)
                blocks = jnp.swapaxes(x[self.layer, :, self.table], 2, 3)
                return blocks.reshape(b, -1, *blocks.shape[3:])

        return jax.tree.map(read, self.k), jax.tree.map(read, self.v)


class PagedDecode(NamedTuple):
    """Decode attention over a paged pool through the Pallas kernel (`paged_attention`): each
    row's one new token attends to its first `lengths[b]` keys. Stands in for the mask."""

    lengths: jax.Array  # int32 [batch]: the row's keys, this call's token included


class Documents(NamedTuple):
    """Uncached attention through a kernel ("splash" or "cudnn"): causal within each packed
    document (`segment_ids` None: one document per row). Stands in for the explicit mask."""

    segment_ids: jax.Array | None
    kernel: str


# The uncached attention kernels besides "xla", by `LlamaConfig.attention` name, and the
# context-parallel modes (`LlamaConfig.context_parallel`) that replace them.
_KERNELS = {
    "splash": splash.splash_attention,
    "cudnn": cudnn_attention.cudnn_attention,
    **{mode: context_parallel.kernel(mode) for mode in context_parallel.MODES},
}


def attention_kernel(c: LlamaConfig, time: int) -> str:
    """The kernel uncached attention uses: `c.attention`, with "auto" resolved for the shapes,
    the compute dtype and the devices the traced code will run on. A context-parallel mode
    ("all_gather", "ring") takes the place of every kernel."""
    if c.context_parallel != "all_to_all":
        return c.context_parallel
    if c.attention != "auto":
        return c.attention
    if splash.suits(time, c.head_dim) and splash.on_tpu():
        return "splash"
    if cudnn_attention.suits(time, c.head_dim, c.compute_dtype) and cudnn_attention.on_gpu():
        return "cudnn"
    return "xla"


def cached_attention_kernel(c: LlamaConfig, cache: KVCache | PagedKVCache, time: int) -> str:
    """The kernel attention over a cache uses: "paged" (the Pallas paged-attention kernel) for
    a float paged pool when `c.attention` is "auto", the call decodes one token per row and
    the traced code runs on TPUs; else "xla" (the row's keys gathered, then
    `grouped_attention`). An int8 pool always takes "xla": the kernel's quantized mode reads
    scales broadcast to the values' full shape, an HBM array as large as the values
    (`paged_attention` says more)."""
    if c.attention != "auto" or not isinstance(cache, PagedKVCache):
        return "xla"
    if isinstance(cache.k, QuantizedKV):
        return "xla"
    if paged_attention.suits(time, c.head_dim, c.n_heads, c.n_kv_heads) and splash.on_tpu():
        return "paged"
    return "xla"


def grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Softmax attention with grouped KV heads: q [b, t, heads, hd], k and v [b, s, kv, hd],
    `mask` [b, t, s] True where a query may attend. Scores and softmax in float32.

    `scales` (k's and v's [b, s, kv]) make k and v an int8 cache's values (`QuantizedKV`):
    each key's scale multiplies its scores and each value's its probabilities, which is
    attention over the dequantized cache without a dequantized copy of it.

    The queries sharing a KV head are laid out as one [group * t, hd] matrix, so both products
    are plain batched matmuls over (b, kv). Written as one 5-d einsum instead, XLA:CPU moved
    every [t, s] score matrix to another layout before the second product, which doubled the
    time of attention over a 512-token prefill.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, hd]
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k).astype(jnp.float32)
    if scales is not None:
        k_scale, v_scale = (x.transpose(0, 2, 1)[:, :, None].astype(jnp.float32) for x in scales)
        scores = scores * k_scale  # [b, kv, 1, s]
    scores = scores.reshape(b, kv, g, t, -1) * np.float32(1.0 / np.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if scales is not None:
        probs = probs * v_scale[:, :, None]  # [b, kv, 1, 1, s]
    probs = probs.astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nnx.Module):
    """Grouped-query attention; weights stacked over layers (`wq` is [layers, dim, heads, hd])."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        L, d, hd, pd = c.n_layers, c.dim, c.head_dim, c.param_dtype
        self.wq = _param(rngs, (L, d, c.n_heads, hd), ("layers", "embed", "heads", "head_dim"), pd)
        kv_axes = ("layers", "embed", "kv_heads", "head_dim")
        self.wk = _param(rngs, (L, d, c.n_kv_heads, hd), kv_axes, pd)
        self.wv = _param(rngs, (L, d, c.n_kv_heads, hd), kv_axes, pd)
        self.wo = _param(rngs, (L, c.n_heads, hd, d), ("layers", "heads", "head_dim", "embed"), pd)

    def __call__(
        self,
        c: LlamaConfig,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array | Documents | PagedDecode,
        cache: LayerCache | None,
        adapters: LayerAdapters = NO_ADAPTERS,
    ) -> tuple[jax.Array, LayerCache | None]:
        """`mask` [batch, time, keys] is True where a query may attend; keys are this call's
        tokens, or with a cache the cache's slots after this call's tokens are written.
        `Documents` instead: no cache, the kernel it names. `PagedDecode`: a paged cache read
        by the Pallas kernel, after this call's tokens are written."""
        dt = x.dtype
        project = partial(adapters.project, module="attention")
        q = project(x, self.wq[...], name="wq")
        k = project(x, self.wk[...], name="wk")
        v = project(x, self.wv[...], name="wv")
        q = constrain(q, (BATCH, LENGTH, HEADS, None))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            cache = cache.write(k, v)
            if isinstance(mask, PagedDecode):
                out = paged_attention.paged_decode_attention(
                    q, cache.k, cache.v, cache.layer, cache.table, mask.lengths
                )
                out = constrain(out, (BATCH, LENGTH, HEADS, None))
                return project(out, self.wo[...], name="wo", contract=2), cache
            k, v = cache.keys_values()
        if isinstance(mask, Documents):
            # Constrained on both sides, the kernel's layout change (sequence split -> heads
            # split) is one all-to-all each way; unconstrained, the partitioner gathered whole
            # activations across all devices in the weight gradients (gigabytes per chip at 405B).
            kv_layout = (BATCH, LENGTH, KV_HEADS, None)
            k, v = constrain(k, kv_layout), constrain(v, kv_layout)
            out = _KERNELS[mask.kernel](q, k, v, mask.segment_ids)
            out = constrain(out, (BATCH, LENGTH, HEADS, None))
            return project(out, self.wo[...], name="wo", contract=2), cache
        if isinstance(k, QuantizedKV):  # an int8 cache: attention applies its scales
            scales = (k.scale, v.scale)
            out = grouped_attention(q, k.values.astype(dt), v.values.astype(dt), mask, scales)
        else:
            out = grouped_attention(q, k.astype(dt), v.astype(dt), mask)
        return project(out, self.wo[...], name="wo", contract=2), cache


class FeedForward(nnx.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        L, d, f, pd = c.n_layers, c.dim, c.ffn_dim, c.param_dtype
        self.w1 = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), pd)
        self.w3 = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), pd)
        self.w2 = _param(rngs, (L, f, d), ("layers", "mlp", "embed"), pd)

    def __call__(self, x: jax.Array, adapters: LayerAdapters = NO_ADAPTERS) -> jax.Array:
        project = partial(adapters.project, module="feed_forward")
        gate = project(x, self.w1[...], name="w1")
        up = project(x, self.w3[...], name="w3")
        h = constrain(jax.nn.silu(gate) * up, (BATCH, LENGTH, MLP))
        return project(h, self.w2[...], name="w2")


class Block(nnx.Module):
    """One transformer layer. Built with stacked (leading `layers` axis) parameters; called
    (by `run_layers`) on one layer's weights, already in the compute dtype."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        self.attention_norm = _ones((c.n_layers, c.dim), ("layers", "norm"), c.param_dtype)
        self.attention = Attention(c, rngs)
        self.ffn_norm = _ones((c.n_layers, c.dim), ("layers", "norm"), c.param_dtype)
        self.feed_forward = FeedForward(c, rngs)

    def __call__(
        self,
        c: LlamaConfig,
        x,
        rope,
        mask,
        cache: LayerCache | None,
        adapters: LayerAdapters = NO_ADAPTERS,
    ):
        normed = rms_norm(x, self.attention_norm[...], c.norm_eps)
        h, cache = self.attention(c, normed, rope, mask, cache, adapters)
        x = constrain(x + h, (BATCH, LENGTH, EMBED))
        x = x + self.feed_forward(rms_norm(x, self.ffn_norm[...], c.norm_eps), adapters)
        return constrain(x, (BATCH, LENGTH, EMBED)), cache


class Transformer(nnx.Module):
    """The parameters of a whole model: embedding, the layer stack (one `Block` with stacked
    weights), final norm and output head (absent when tied to the embedding), and a sequence
    classifier's `score` head. Run it with `forward` on its pure-dict state, or call it."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.config = config
        self.tok_embeddings = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), pd)
        self.layers = Block(c, rngs)
        self.norm = _ones((c.dim,), ("norm",), pd)
        if not c.tie_embeddings:
            self.output = _param(rngs, (c.dim, c.vocab_size), ("embed", "vocab"), pd)
        if c.num_labels:  # a sequence classifier's head (see `llama_jax.reward_model`)
            self.score = _param(rngs, (c.dim, c.num_labels), ("embed", "labels"), pd)

    def __call__(self, tokens: jax.Array, **kwargs: Any) -> tuple[jax.Array, KVCache | None]:
        """`forward` over this module's own parameters (same keywords)."""
        return forward(nnx.to_pure_dict(nnx.state(self)), tokens, config=self.config, **kwargs)


# A stacked weight tree (leading `layers` axis) or one tree per layer.
Layers = Params | Sequence[Params]


def run_layers(
    c: LlamaConfig,
    layers: Layers,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array | Documents | PagedDecode,
    cache: LayerCache | None = None,
    adapters: Adapters | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """`x` through every layer: a `scan` over stacked weights (compile time independent of
    depth), or a Python loop over a sequence of per-layer weight trees (unrolled; CPU engines
    use this form, see `infer.layer_views`). With a `cache`, every layer writes its new tokens
    into the stacked cache arrays, which ride in the carry. `adapters` (stacked like the
    weights) ride in the scan beside them."""
    dt = jnp.dtype(c.compute_dtype)
    block = _block_graphdef(c)
    stacked_adapters = {} if adapters is None else adapters.weights

    def one_layer(
        weights: Params, x: jax.Array, kv: tuple | None, i: jax.Array | int, lora: Params
    ):
        # Cast here, inside the rematerialised function: the backward pass then keeps the
        # float32 weights themselves, not a stacked compute-dtype copy of every layer.
        weights, lora = jax.tree.map(
            partial(cast_for_compute, dtype=dt), (weights, lora), is_leaf=is_quantized
        )
        layer_cache = None if kv is None else cache._replace(k=kv[0], v=kv[1], layer=i)
        layer_adapters = NO_ADAPTERS
        if adapters is not None:
            rng = None if adapters.rng is None else jax.random.fold_in(adapters.rng, i)
            layer_adapters = LayerAdapters(lora, adapters.scale, adapters.dropout, rng)
        x, layer_cache = nnx.merge(block, weights)(c, x, rope, mask, layer_cache, layer_adapters)
        return x, None if layer_cache is None else (layer_cache.k, layer_cache.v)

    if c.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[c.remat])
    carry = (x, None if cache is None else (cache.k, cache.v))
    if isinstance(layers, Sequence):
        for i, weights in enumerate(layers):
            lora = jax.tree.map(lambda a, i=i: a[i], stacked_adapters)
            carry = one_layer(weights, *carry, i, lora)
    else:
        layer_ids = jnp.arange(c.n_layers, dtype=jnp.int32)
        step = lambda carry, xs: (one_layer(xs[0], *carry, xs[1], xs[2]), None)  # noqa: E731
        carry = jax.lax.scan(step, carry, (layers, layer_ids, stacked_adapters))[0]
    x, kv = carry
    return x, None if kv is None else cache._replace(k=kv[0], v=kv[1])


def attention_mask(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """[batch, time, time] causal mask that also keeps packed documents apart."""
    t = shape[1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (shape[0], t, t))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same


def _last_valid(x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Each row's last non-padding position, [batch, 1, dim] (padding is on the right)."""
    if segment_ids is None:
        return x[:, -1:]
    last = jnp.maximum(jnp.sum(segment_ids != 0, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)


# --- the pure-functional boundary -----------------------------------------------------------


@cache
def _abstract(config: LlamaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0))))


@cache
def _block_graphdef(config: LlamaConfig) -> nnx.GraphDef:
    """The structure of one layer (`Block`): any layer's weights merge into it."""
    return nnx.split(nnx.eval_shape(lambda: Block(config, nnx.Rngs(0))))[0]


def graphdef(config: LlamaConfig) -> nnx.GraphDef:
    return _abstract(config)[0]


def param_shapes(config: LlamaConfig) -> Params:
    """Pure dict of `jax.ShapeDtypeStruct`, nothing allocated."""
    return nnx.to_pure_dict(_abstract(config)[1])


def logical_axes(config: LlamaConfig) -> Params:
    """Pure dict (same structure as params) of each parameter's logical axis names."""

    def names(node: Any) -> Any:
        if isinstance(node, nnx.Variable):
            return tuple(node.get_metadata()["logical_axes"])
        return {key: names(child) for key, child in node.items()}

    return names(_abstract(config)[1])


def init_params(config: LlamaConfig, seed: int = 0) -> Params:
    """Random parameters (normal(0, 0.02) weights, unit norms) as a pure dict."""
    _, state = nnx.split(Transformer(config, nnx.Rngs(seed)))
    return nnx.to_pure_dict(state)


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | PagedKVCache | None = None,
    *,
    config: LlamaConfig,
    last_only: bool = False,
    hidden_only: bool = False,
    adapters: Adapters | None = None,
) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
    """Logits float32 [batch, time, vocab] (or [batch, 1, vocab] with `last_only`) and the
    updated cache. Pure: jit it with `config` static.

    `params["layers"]` is stacked (as stored) or a sequence of per-layer trees (see
    `run_layers`). `positions` default to 0..T-1 (continuing from the cache's lengths when a
    cache is given). `segment_ids` separate packed documents; 0 marks right padding. The cache
    is a `KVCache` (a row per sequence) or a `PagedKVCache` (blocks of a shared pool).
    `hidden_only` returns the final-normed hidden states [batch, time, dim] in the compute
    dtype instead of logits, for callers that apply the head piecewise (`output_logits`), e.g.
    a chunked training loss. `adapters` adds low-rank adapters to the layers' projections.
    """
    c = config
    b, t = tokens.shape
    if positions is None:
        start = 0 if cache is None else cache.lengths[:, None]
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    x = jnp.take(params["tok_embeddings"], tokens, axis=0).astype(c.compute_dtype)
    x = constrain(x, (BATCH, LENGTH, EMBED))
    rope = rotary_tables(c, positions)
    if cache is None:
        kernel = attention_kernel(c, t)
        if kernel != "xla":
            mask: jax.Array | Documents = Documents(segment_ids, kernel)
        else:
            mask = attention_mask(segment_ids, (b, t))
        x, _ = run_layers(c, params["layers"], x, rope, mask, adapters=adapters)
        new_cache = None
    else:
        at = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # the new tokens' indices
        layer_cache, keys = _layer_cache(cache, at)
        if cached_attention_kernel(c, cache, t) == "paged":
            # each row attends to its keys up to and including the new token (the mask below)
            mask = PagedDecode(jnp.minimum(at[:, 0] + 1, keys))
        else:
            mask = jnp.arange(keys, dtype=jnp.int32)[None, None, :] <= at[:, :, None]
        x, layer_cache = run_layers(c, params["layers"], x, rope, mask, layer_cache, adapters)
        if segment_ids is None:
            advance = jnp.full((b,), t, jnp.int32)
        else:
            advance = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        new_cache = cache._replace(
            k=layer_cache.k, v=layer_cache.v, lengths=cache.lengths + advance
        )
    if last_only:
        x = _last_valid(x, segment_ids)
    x = rms_norm(x, params["norm"], c.norm_eps)
    if hidden_only:
        return x, new_cache
    return output_logits(params, x, config=c), new_cache


def _layer_cache(cache: KVCache | PagedKVCache, at: jax.Array) -> tuple[LayerCache, int]:
    """Where the new tokens at indices `at` [batch, time] go, and how many keys each row reads.

    A row of a contiguous cache is written at `at` directly. In a paged pool (heads-first,
    [layers, kv_heads, blocks, block_size, head_dim]) token `i` lives in block
    `block_tables[row, i // block_size]`; indices past a row's table go to the block one
    past the pool's end, so the write is dropped. Reads clip the table into the pool: entries
    past a row's blocks are beyond its length, and the mask hides them.
    """
    b = at.shape[0]
    if isinstance(cache, KVCache):
        rows = jnp.arange(b, dtype=jnp.int32)[:, None]
        return LayerCache(cache.k, cache.v, 0, rows, at), cache.max_len
    bs, width = cache.block_size, cache.block_tables.shape[1]
    index = at // bs
    held = jnp.take_along_axis(cache.block_tables, jnp.minimum(index, width - 1), axis=1)
    blocks = jnp.where(index < width, held, cache.num_blocks)
    table = jnp.minimum(cache.block_tables, cache.num_blocks - 1)
    return LayerCache(cache.k, cache.v, 0, blocks, at % bs, table), width * bs


def output_logits(params: Params, hidden: jax.Array, *, config: LlamaConfig) -> jax.Array:
    """Output head: final-normed hidden states -> float32 logits. Quantized params carry a
    `Quantized` head under `output`, tied or not (`llama_jax.quantize`)."""
    head = params.get("output")
    if not is_quantized(head):
        head = (params["tok_embeddings"].T if config.tie_embeddings else head).astype(hidden.dtype)
    logits = dense(hidden, head).astype(jnp.float32)
    return constrain(logits, (BATCH, LENGTH, VOCAB))
