"""The hook through which the model names its activation axes for sharding.

The model core must not depend on `sharding/` (dependencies point one way), yet activations
need sharding constraints on a real mesh. The model calls `constrain(x, logical_names)`; it is a
no-op until `sharding` installs a resolver (logical names -> `jax.sharding.NamedSharding`) with
`use_resolver`, typically around tracing of a jitted step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# The logical names of activations (the rule table in `sharding.rules` maps them to mesh axes).
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, KV_HEADS, MLP, VOCAB = (
    "activation_heads",
    "activation_kv_heads",
    "activation_mlp",
    "activation_vocab",
)
# Inside the splash kernel's shard_map: a sequence split there becomes a heads split.
ATTENTION_HEADS = "activation_attention_heads"
# Input batches [batch, length] (tokens, targets, positions, segment ids, loss masks).
BATCH_AXES = (BATCH, LENGTH)

Resolver = Callable[[Sequence[str | None]], "jax.sharding.Sharding | None"]

_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "llama_jax_sharding_resolver", default=None
)


@contextlib.contextmanager
def use_resolver(resolver: Resolver | None) -> Iterator[None]:
    """Activate `resolver` for model code traced inside this block."""
    token = _resolver.set(resolver)
    try:
        yield
    finally:
        _resolver.reset(token)


def sharding_for(names: Sequence[str | None]) -> jax.sharding.Sharding | None:
    """The sharding logical axis `names` map to; None when no resolver is active."""
    resolver = _resolver.get()
    return None if resolver is None else resolver(names)


def traced_device() -> jax.Device:
    """A device traced code will run on, for choosing kernels: the active mesh's first device,
    else the default backend's (an `AbstractMesh` has no devices)."""
    sharding = sharding_for((BATCH,))
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    devices = getattr(mesh, "devices", None)
    if devices is not None and devices.size:
        return devices.flat[0]
    return jax.devices()[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain `x` to the sharding its logical axis `names` map to, if a resolver is active."""
    sharding = sharding_for(names)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def placed_shapes(shapes: Any, shardings: Any) -> Any:
    """Each leaf's shape and dtype (from arrays or `ShapeDtypeStruct`s) with its sharding from
    the matching tree `shardings`: what Orbax restores into (loading, run directories, training's
    resume) and what an ahead-of-time compile takes."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
