"""The one table mapping logical axis names to mesh axes, and its named presets.

The model, KV cache and batches name their axes logically (see docs/DESIGN.md); this table
says which mesh axes each name is split over, one column per preset. Mesh axes of size 1 or
absent from the mesh drop out, and a mesh axis already used by an earlier dimension of the same
array is skipped, so every preset works on every mesh: ``fsdp`` on ``data=8`` is plain data
parallelism, ``fsdp_tp`` on ``fsdp=8`` is plain FSDP.

Presets:
  fsdp      ZeRO-3: weights, gradients and optimizer state split over fsdp*sequence*tensor
            (the tensor axis acts as more FSDP), batch over data*fsdp*tensor.
  fsdp_tp   FSDP over fsdp*sequence plus Megatron tensor parallelism: heads, kv heads, MLP and
            vocab split over tensor; the residual stream is replicated over tensor.
  dp        pure data parallelism: weights replicated, batch over every axis.
  infer_tp  inference: weights split over tensor only (no per-step all-gathers), KV cache over
            batch (data*fsdp) and kv heads (tensor).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import lora as lora_lib
from llama_jax import model as llama_model
from llama_jax.config import LlamaConfig
from llama_jax.lora import LoraConfig
from llama_jax.partitioning import use_resolver
from sharding.mesh import AXES, ShardingError

Rules = Mapping[str, tuple[str, ...]]

R: tuple[str, ...] = ()  # replicated
T = ("tensor",)
S = ("sequence",)
# FSDP: the sequence axis shards weights too (it has no other use for them)
F = ("fsdp", "sequence")
FT = ("fsdp", "sequence", "tensor")
TS = ("tensor", "sequence")
B = ("data", "fsdp")
BT = ("data", "fsdp", "tensor")
ALL = ("data", "fsdp", "sequence", "tensor")

PRESET_NAMES = ("fsdp", "fsdp_tp", "dp", "infer_tp")
# fmt: off
TABLE: dict[str, tuple[tuple[str, ...], ...]] = {
    #  logical name          fsdp  fsdp_tp  dp   infer_tp
    # parameters (optimizer state and gradients follow them)
    "vocab":                (R,    T,       R,   T),
    "embed":                (FT,   F,       R,   R),
    "heads":                (R,    T,       R,   T),
    "kv_heads":             (R,    T,       R,   T),
    "head_dim":             (R,    R,       R,   R),
    "mlp":                  (R,    T,       R,   T),
    "layers":               (R,    R,       R,   R),
    "norm":                 (FT,   F,       R,   R),
    # a sequence classifier's (reward model's) score head [embed, labels]: a few columns
    "labels":               (R,    R,       R,   R),
    # LoRA adapters: a [layers, *in, lora_rank], b [layers, lora_rank, *out]; the rest of their
    # axes are the weight's own
    "lora_rank":            (R,    R,       R,   R),
    # activations (model.constrain) and input batches [batch, length]
    "activation_batch":     (BT,   B,       ALL, B),
    "activation_length":    (S,    S,       R,   R),
    "activation_embed":     (R,    R,       R,   R),
    "activation_heads":     (R,    T,       R,   T),
    "activation_kv_heads":  (R,    T,       R,   T),
    # the splash kernel's heads: a sequence split becomes a heads split inside attention
    "activation_attention_heads": (S, TS,   S,   T),
    "activation_mlp":       (R,    T,       R,   T),
    "activation_vocab":     (R,    T,       R,   T),
    # KV cache [layers, batch, max_len, kv_heads, head_dim]
    "cache_layers":         (R,    R,       R,   R),
    "cache_batch":          (BT,   B,       ALL, B),
    "cache_sequence":       (R,    R,       R,   R),
    "cache_kv_heads":       (R,    T,       R,   T),
    "cache_head_dim":       (R,    R,       R,   R),
    # paged KV pool [layers, kv_heads, blocks, block_size, head_dim]: any block may serve any
    # sequence, so blocks stay whole on every device; the heads split as above
    "cache_blocks":         (R,    R,       R,   R),
    "cache_block":          (R,    R,       R,   R),
}
# fmt: on
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    name: {logical: row[i] for logical, row in TABLE.items()} for i, name in enumerate(PRESET_NAMES)
}
DEFAULT_MESH = {
    "fsdp": "fsdp=-1",
    "fsdp_tp": "fsdp=-1,tensor=4",
    "dp": "data=-1",
    "infer_tp": "tensor=-1",
}

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def get_rules(rules: str | Rules) -> Rules:
    """A preset by name, or a custom table (checked to name only known mesh axes)."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ShardingError(f"unknown sharding preset {rules!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[rules]
    for name, axes in rules.items():
        unknown = set(axes) - set(AXES)
        if unknown:
            raise ShardingError(f"rule {name!r} names unknown mesh axes {sorted(unknown)}")
    return rules


def logical_to_spec(
    names: Sequence[str | None],
    sizes: Mapping[str, int],
    rules: str | Rules,
    shape: Sequence[int] | None = None,
    what: str = "array",
) -> PartitionSpec:
    """The `PartitionSpec` for an array whose dimensions have logical `names`.

    `sizes` are the mesh axis sizes. With `shape`, every split dimension is checked to divide
    evenly, and the error names the array, the dimension and the mesh axes.
    """
    table = get_rules(rules)
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{what}: logical axis {name!r} has no sharding rule")
        axes = tuple(a for a in table[name] if sizes.get(a, 1) > 1 and a not in used)
        split = math.prod(sizes[a] for a in axes)
        if shape is not None and shape[i] % split:
            over = "*".join(axes) + f"={split}" if len(axes) > 1 else f"{axes[0]}={split}"
            raise ShardingError(
                f"{what}: dimension {i} ({name}) of size {shape[i]} does not divide over {over}"
            )
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def split_size(name: str, mesh: Mesh, rules: str | Rules) -> int:
    """How many pieces the rules cut a dimension with logical `name` into on `mesh` (a size
    that dimension must be a multiple of)."""
    spec = logical_to_spec((name,), dict(mesh.shape), rules)
    axes = spec[0] if spec else None
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def logical_to_sharding(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: str | Rules,
    shape: Sequence[int] | None = None,
    what: str = "array",
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, dict(mesh.shape), rules, shape, what))


def param_specs(config: LlamaConfig, sizes: Mapping[str, int], rules: str | Rules) -> Any:
    """`PartitionSpec` per parameter (pure dict like the params), from shapes alone."""
    return jax.tree.map_with_path(
        lambda path, names, shape: logical_to_spec(
            names, sizes, rules, shape.shape, f"parameter {path_str(path)}"
        ),
        llama_model.logical_axes(config),
        llama_model.param_shapes(config),
        is_leaf=_is_names,
    )


def adapter_specs(
    config: LlamaConfig, lora: LoraConfig, sizes: Mapping[str, int], rules: str | Rules
) -> Any:
    """`PartitionSpec` per LoRA adapter leaf (the tree of `llama_jax.lora.adapter_shapes`)."""
    return jax.tree.map_with_path(
        lambda path, names, shape: logical_to_spec(
            names, sizes, rules, shape.shape, f"adapter {path_str(path)}"
        ),
        lora_lib.adapter_axes(config, lora),
        lora_lib.adapter_shapes(config, lora),
        is_leaf=_is_names,
    )


def param_shardings(config: LlamaConfig, mesh: Mesh, rules: str | Rules) -> Any:
    """`NamedSharding` per parameter (pure dict like the params)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(config, dict(mesh.shape), rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def resolver(mesh: Mesh, rules: str | Rules) -> Callable[[Sequence[str | None]], NamedSharding]:
    """Logical names -> sharding, for `llama_jax.partitioning.use_resolver`."""
    table = get_rules(rules)
    return lambda names: logical_to_sharding(names, mesh, table)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
    """Constrain the model's activations to `rules` on `mesh` for code traced in this block."""
    with use_resolver(resolver(mesh, rules)):
        yield


def with_rules(fn: Callable[..., Any], mesh: Mesh, rules: str | Rules) -> Callable[..., Any]:
    """`fn` with activation constraints active while it is traced.

    Wrap before `jax.jit`: the constraints are baked in at trace time, and a fresh wrapper per
    (mesh, rules) keeps jit's cache from reusing a trace made for another mesh.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with use_rules(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def path_str(path: Sequence[Any]) -> str:
    """'layers/attention/wq' for a pytree key path."""
    return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, str) for n in x)
