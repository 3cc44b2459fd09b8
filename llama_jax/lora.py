"""Low-rank adapters (LoRA): which projections they sit on, their shapes, logical axes,
initialisation and merging into the base weights.

An adapter on a projection `W [L, *in, *out]` is `a [L, *in, r]` and `b [L, r, *out]`, so the
layer computes `W x + (alpha / r) * b(a(x))` (`llama_jax.model.Adapters` runs it). The tree of
adapters mirrors the params' `layers` subtree with `{"a", "b"}` in place of each adapted
weight. `a` keeps the weight's input axes and `b` its output axes, so the rule table places
them like their weight (FSDP splits `a`'s embed axis, tensor parallelism `b`'s heads or MLP
axis); the rank axis (`lora_rank`) is replicated. `b` starts at zero, so a fresh adapter
changes nothing; `a` starts like PEFT's (Kaiming-uniform, bound 1 / sqrt(fan_in)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.model import Adapters, Params, logical_axes, param_shapes

# Short target name -> (module, weight, number of input axes of the weight after `layers`).
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attention", "wq", 1),
    "k": ("attention", "wk", 1),
    "v": ("attention", "wv", 1),
    "o": ("attention", "wo", 2),
    "gate": ("feed_forward", "w1", 1),
    "up": ("feed_forward", "w3", 1),
    "down": ("feed_forward", "w2", 1),
}
RANK_AXIS = "lora_rank"


class LoraError(ConfigError):
    """LoRA settings, or an adapter, that do not fit the model."""


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and targets of a set of adapters. `scale` is alpha / rank (alpha / sqrt(rank)
    with `rslora`, PEFT's rank-stabilised variant); `dropout` applies to each adapter's input
    during training."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise LoraError(
                f"--lora-targets: no projection named {', '.join(unknown)}; "
                f"known: {','.join(TARGETS)}"
            )
        if not self.targets:
            raise LoraError("--lora-targets: name at least one projection")
        if self.rank < 1:
            raise LoraError(f"--lora-rank {self.rank}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"--lora-dropout {self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dropout": self.dropout,
            "rslora": self.rslora,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            targets=tuple(d["targets"]),
            dropout=float(d.get("dropout", 0.0)),
            rslora=bool(d.get("rslora", False)),
        )


def parse_targets(text: str) -> tuple[str, ...]:
    """`"q,k,v"` -> ("q", "k", "v"); `all` names every projection."""
    if text.strip() == "all":
        return tuple(TARGETS)
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _split(config: LlamaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple]:
    """(input dims, output dims, the weight's logical axes) of one target's weight, per layer."""
    module, name, n_in = TARGETS[target]
    shape = param_shapes(config)["layers"][module][name].shape[1:]
    axes = logical_axes(config)["layers"][module][name][1:]
    return shape[:n_in], shape[n_in:], axes


def adapter_shapes(config: LlamaConfig, lora: LoraConfig, dtype: str = "float32") -> Params:
    """The adapter tree as `ShapeDtypeStruct`s: `{module: {weight: {"a": ..., "b": ...}}}`."""
    out: Params = {}
    for target in lora.targets:
        module, name, _ = TARGETS[target]
        ins, outs, _ = _split(config, target)
        L, r = config.n_layers, lora.rank
        out.setdefault(module, {})[name] = {
            "a": jax.ShapeDtypeStruct((L, *ins, r), jnp.dtype(dtype)),
            "b": jax.ShapeDtypeStruct((L, r, *outs), jnp.dtype(dtype)),
        }
    return out


def adapter_axes(config: LlamaConfig, lora: LoraConfig) -> Params:
    """Logical axis names of every adapter leaf (same tree as `adapter_shapes`)."""
    out: Params = {}
    for target in lora.targets:
        module, name, n_in = TARGETS[target]
        _, _, axes = _split(config, target)
        out.setdefault(module, {})[name] = {
            "a": ("layers", *axes[:n_in], RANK_AXIS),
            "b": ("layers", RANK_AXIS, *axes[n_in:]),
        }
    return out


def init_adapters(config: LlamaConfig, lora: LoraConfig, seed: int = 0) -> Params:
    """Fresh adapters: `a` uniform in +-1 / sqrt(fan_in) (PEFT's default), `b` zero."""
    shapes = adapter_shapes(config, lora)
    key = jax.random.key(seed)
    out: Params = {}
    for i, target in enumerate(lora.targets):
        module, name, _ = TARGETS[target]
        a, b = shapes[module][name]["a"], shapes[module][name]["b"]
        fan_in = math.prod(a.shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out.setdefault(module, {})[name] = {
            "a": jax.random.uniform(jax.random.fold_in(key, i), a.shape, a.dtype, -bound, bound),
            "b": jnp.zeros(b.shape, b.dtype),
        }
    return out


def adapters_for(weights: Params, lora: LoraConfig, rng: jax.Array | None = None) -> Adapters:
    """The `Adapters` a forward pass takes: dropout only when `rng` is given (training)."""
    return Adapters(weights, lora.scale, lora.dropout if rng is not None else 0.0, rng)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * a @ b` in float32, shaped like the weight: [L, *in, *out]."""
    L, r = a.shape[0], a.shape[-1]
    low = a.astype(jnp.float32).reshape(L, -1, r)
    high = b.astype(jnp.float32).reshape(L, r, -1)
    return (scale * (low @ high)).reshape(L, *a.shape[1:-1], *b.shape[2:])


def merge(params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """The base params with every adapter folded in (`W + scale * a @ b`, in float32, stored in
    W's dtype): a plain model that computes what the adapted one does."""
    layers = dict(params["layers"])
    for module, weights in adapters.items():
        layers[module] = dict(layers[module])
        for name, ab in weights.items():
            w = layers[module][name]
            merged = w.astype(jnp.float32) + delta(ab["a"], ab["b"], lora.scale)
            layers[module][name] = merged.astype(w.dtype)
    return {**params, "layers": layers}


def check_adapters(adapters: Params, config: LlamaConfig, lora: LoraConfig, where: str) -> None:
    """Raise `LoraError` naming `where` and the module when an adapter's shapes do not match
    the model (another base, another rank)."""
    expected = adapter_shapes(config, lora)
    for target in lora.targets:
        module, name, _ = TARGETS[target]
        got = adapters.get(module, {}).get(name)
        if got is None:
            raise LoraError(f"{where}: no adapter for {module}.{name} (target {target!r})")
        for part in ("a", "b"):
            want = expected[module][name][part].shape
            if tuple(got[part].shape) != tuple(want):
                raise LoraError(
                    f"{where}: adapter {module}.{name}.{part} has shape {tuple(got[part].shape)}, "
                    f"the model needs {tuple(want)} (rank {lora.rank}; another base model?)"
                )


def targets_of(adapters: Params) -> Sequence[str]:
    """The short target names an adapter tree covers, in `TARGETS` order."""
    return [t for t, (m, n, _) in TARGETS.items() if n in adapters.get(m, {})]
