"""Weight-only quantization for inference: int8 or float8 (e4m3) projections, one float32 scale
per output channel.

Every projection of the layer stack (wq wk wv wo w1 w2 w3) and the output head become
`Quantized(values, scale)`; norms and the embedding table stay as they are (a tied head gets a
quantized copy of the table under `output`, the table itself still serves the lookup).
`dense` then computes `(x @ values) * scale`, which for per-output-channel scales is the
dequantized product exactly, so the weights are read as 1-byte values.

Why our own code rather than Google's `qwix`: qwix's PTQ intercepts `dot_general` inside NNX
module calls and rewrites the modules' `nnx.Param`s; our `forward` is a pure function over a
dict, merging one layer's weights into a `Block` inside a `lax.scan`, and the quantized weights
must also carry logical axes for the rule table and round-trip through our checkpoints. The
arithmetic is a few lines; the layout below is what needed care.

Layout: `values` holds the output axes first, `[*out, *in]` (wq `[dim, H, hd]` is stored
`[H, hd, dim]`), so each output channel's weights are contiguous. Why: XLA:CPU does not fuse
an int8 -> float convert into its matmuls; `x @ values.astype(float32)` writes and reads a
float copy of the whole weight per call, slower than the float weights. On CPU (one device)
`dense` therefore runs over chunks of output rows, each converted into a cache-sized buffer
and multiplied there (`_CHUNK_ELEMENTS`); contiguous rows make each chunk one plain read. On
TPU and GPU the compilers fuse the convert into the matmul and the product is one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.partitioning import sharding_for, traced_device

Params = dict[str, Any]

# Storage dtype and the largest magnitude it holds, by `--quantize` mode.
MODES: dict[str, tuple[jnp.dtype, float]] = {
    "int8": (jnp.dtype(jnp.int8), 127.0),
    "fp8": (jnp.dtype(jnp.float8_e4m3fn), float(jnp.finfo(jnp.float8_e4m3fn).max)),
}

# (module, name) under `layers`, and how many input axes it contracts, of every projection.
_LAYER_PROJECTIONS = (
    (("attention", "wq"), 1),
    (("attention", "wk"), 1),
    (("attention", "wv"), 1),
    (("attention", "wo"), 2),
    (("feed_forward", "w1"), 1),
    (("feed_forward", "w2"), 1),
    (("feed_forward", "w3"), 1),
)

# Elements of one converted chunk on CPU: 128K float32 values (512 KiB) stay in a core's L2.
# On bench-155m's head ([128256, 512] int8) this ran a batch-1 product 2.4x faster than the
# float32 matmul; a float copy of the whole weight ran 12x slower.
_CHUNK_ELEMENTS = 1 << 17


class Quantized(NamedTuple):
    """A quantized projection: `values [*out, *in]` (int8 or float8_e4m3fn) and float32 `scale
    [*out]`; the weight is `values * scale` over the output axes (stacked weights keep their
    leading `layers` axis on both)."""

    values: jax.Array
    scale: jax.Array

    def __getitem__(self, index: Any) -> Any:
        """`w[...]` is `w`: the model's modules read their weights as `self.wq[...]`."""
        return self if index is Ellipsis else tuple.__getitem__(self, index)


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _to_output_first(ndim: int, lead: int, contract: int) -> tuple[int, ...]:
    """The permutation putting a weight's output axes before its `contract` input axes."""
    axes = tuple(range(ndim))
    return axes[:lead] + axes[lead + contract :] + axes[lead : lead + contract]


def quantize_weight(w: jax.Array, mode: str, contract: int = 1, lead: int = 0) -> Quantized:
    """`w [*lead, *in, *out]` (`contract` input axes) quantized with one scale per output
    channel (and per `lead` index, e.g. per layer): the absolute maximum over the inputs maps
    to the storage type's largest value."""
    dtype, top = MODES[check_mode(mode)]
    w = jnp.transpose(w.astype(jnp.float32), _to_output_first(w.ndim, lead, contract))
    inputs = tuple(range(w.ndim - contract, w.ndim))
    amax = jnp.max(jnp.abs(w), axis=inputs)
    scale = jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)
    scaled = w / scale.reshape(*scale.shape, *([1] * contract))
    if dtype == jnp.int8:
        scaled = jnp.round(jnp.clip(scaled, -top, top))
    return Quantized(scaled.astype(dtype), scale)


def dequantize(q: Quantized, contract: int = 1, lead: int = 0) -> jax.Array:
    """The float32 weight `q` stands for, in the float layout `[*lead, *in, *out]`."""
    w = q.values.astype(jnp.float32) * q.scale.reshape(*q.scale.shape, *([1] * contract))
    back = np.argsort(_to_output_first(w.ndim, lead, contract))
    return jnp.transpose(w, tuple(int(i) for i in back))


def _float_head(tree: Params, config: LlamaConfig, transpose: Callable[[Any], Any]) -> Any:
    """The output head `[dim, vocab]` of a float tree (or of its axes): `output`, or the
    embedding table `[vocab, dim]` transposed when tied."""
    return transpose(tree["tok_embeddings"]) if config.tie_embeddings else tree["output"]


def _quantize_head(params: Params, config: LlamaConfig, mode: str) -> Quantized:
    """The head quantized in one jitted call (a tied table's transpose folds into it)."""
    return jax.jit(lambda p: quantize_weight(_float_head(p, config, jnp.transpose), mode))(
        {k: params[k] for k in ("tok_embeddings", "output") if k in params}
    )


def _map_projections(params: Params, one: Callable[[Any, int], Any], head: Any) -> Params:
    """`params` with every layer projection replaced by `one(weight, contract)` and `output`
    set to `head`."""
    out = dict(params)
    layers = {k: dict(v) if isinstance(v, dict) else v for k, v in params["layers"].items()}
    for (module, name), contract in _LAYER_PROJECTIONS:
        layers[module][name] = one(layers[module][name], contract)
    out["layers"] = layers
    out["output"] = head
    return out


def quantize_params(params: Params, config: LlamaConfig, mode: str = "int8") -> Params:
    """`params` (float, layers stacked as stored) with every projection and the output head
    `Quantized` in `mode` ("int8" or "fp8"); the rest unchanged. Runs jitted per weight, so
    it needs at most one float copy of one weight beside the result. Quantized params run
    through `forward` like float ones (inference only: there is no gradient)."""
    check_mode(mode)
    if is_quantized(params.get("output")):
        raise ValueError("params are quantized already")

    head = _quantize_head(params, config, mode)
    return _map_projections(params, lambda w, contract: _quantize_jit(w, mode, contract, 1), head)


_quantize_jit = jax.jit(quantize_weight, static_argnums=(1, 2, 3))


def quantized_shapes(shapes: Params, config: LlamaConfig, mode: str) -> Params:
    """`quantize_params`'s result as `jax.ShapeDtypeStruct`s, from the float `shapes`
    (`model.param_shapes`); nothing allocated."""
    return jax.eval_shape(lambda p: quantize_params(p, config, mode), shapes)


def quantized_logical_axes(axes: Params, config: LlamaConfig) -> Params:
    """Logical axis names for quantized params, from the float ones (`model.logical_axes`):
    values take the weight's names output-first, scales the output names. The rule table
    then splits a quantized weight as it splits the float one."""

    def one(names: tuple[str, ...], contract: int, lead: int = 1) -> Quantized:
        values = tuple(names[i] for i in _to_output_first(len(names), lead, contract))
        return Quantized(values, values[: len(values) - contract])

    head = _float_head(axes, config, lambda names: tuple(reversed(names)))
    return _map_projections(axes, one, one(head, 1, 0))


def as_quantized(params: Params, config: LlamaConfig, mode: str) -> Params:
    """`params` in `mode`: quantized now, or as they are when a quantized checkpoint in that
    mode was loaded (another mode is an error: re-quantizing would compound the rounding)."""
    stored = quantization_of(params)
    if stored is None:
        return quantize_params(params, config, mode)
    if stored != check_mode(mode):
        raise ValueError(f"--quantize {mode}: the checkpoint is stored quantized as {stored}")
    return params


def quantization_of(params: Params) -> str | None:
    """The mode `params` are quantized in, or None for float params."""
    head = params.get("output")
    if not is_quantized(head):
        return None
    dtype = jnp.dtype(head.values.dtype)
    return next(mode for mode, (stored, _) in MODES.items() if stored == dtype)


def _cpu_chunk(n: int, k: int) -> int | None:
    """Output rows per chunk for an `[n, k]` product on one CPU device (see the module
    docstring); None off the CPU, on a mesh, or when no chunk of a useful size divides `n`."""
    if sharding_for((None,)) is not None or traced_device().platform != "cpu":
        return None
    most = max(_CHUNK_ELEMENTS // k, 1)
    if n <= most:
        return None
    chunk = max(c for c in range(1, most + 1) if n % c == 0)
    return chunk if chunk * 8 >= most else None


def quantized_dense(x: jax.Array, w: Quantized, contract: int = 1) -> jax.Array:
    """`x [..., *in]` times the weight `w` stands for, in x's dtype: `(x @ values) * scale`."""
    lead = x.shape[: x.ndim - contract]
    k = math.prod(x.shape[x.ndim - contract :])
    out_shape = w.scale.shape
    n = math.prod(out_shape)
    x2, values = x.reshape(-1, k), w.values.reshape(n, k)
    chunk = _cpu_chunk(n, k)
    if chunk is None:
        y = x2 @ values.astype(x.dtype).T
    else:
        parts = jax.lax.map(
            lambda v: x2 @ v.astype(x.dtype).T, values.reshape(n // chunk, chunk, k)
        )
        y = jnp.moveaxis(parts, 0, 1).reshape(x2.shape[0], n)
    y = (y * w.scale.reshape(n)).astype(x.dtype)
    return y.reshape(*lead, *out_shape)
