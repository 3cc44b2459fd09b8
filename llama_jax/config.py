"""Model configuration: one frozen dataclass, presets read from data, Meta/HF config readers.

Everything about a model comes from its config file. Nothing here is keyed on a model's name:
presets are rows of `presets.json`, and the Meta `params.json` / HF `config.json` readers derive
every field (FFN width, RoPE scaling, tying) from the file's own values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("auto", "xla", "splash", "cudnn")
# How uncached attention splits a sequence sharded over the `sequence` mesh axis
# (`llama_jax.context_parallel`): regrouped into a heads split around the kernel, or kept split
# with K/V all-gathered or passed around a ring.
CONTEXT_PARALLEL = ("all_to_all", "all_gather", "ring")


class ConfigError(ValueError):
    """A config file or field is not what a Llama 3 model needs."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (`rope_type: llama3`): long wavelengths are slowed by `factor`."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of one Llama 3.x model.

    `param_dtype` is what the weights are stored in (fp32 master weights in training);
    `compute_dtype` is what matmuls run in. `remat` picks the activation checkpointing policy of
    the scanned layer stack. `attention` picks the kernel of uncached attention: "xla" (plain
    einsums, any backend), "splash" (the Pallas TPU kernel: no [time, time] scores in memory),
    "cudnn" (cuDNN's flash attention on NVIDIA GPUs, bfloat16/float16 compute), "auto" (splash
    on TPUs, cudnn on NVIDIA GPUs, when the shapes and dtype suit the kernel; else xla).
    `context_parallel` picks how attention treats a sequence split over devices: "all_to_all"
    (the kernel above on whole sequences, heads split), or "all_gather" / "ring" (load-balanced
    context parallelism, `llama_jax.context_parallel`, which replaces the kernel).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    context_parallel: str = "all_to_all"
    num_labels: int = 0

    def __post_init__(self) -> None:
        if self.num_labels < 0:
            raise ConfigError(f"num_labels must be >= 0 (0: a causal LM), got {self.num_labels}")
        if self.num_labels:
            object.__setattr__(self, "tie_embeddings", True)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(
                f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}"
            )
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ConfigError(
                f"context_parallel must be one of {CONTEXT_PARALLEL}, got {self.context_parallel!r}"
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def param_count(self) -> int:
        """Exact parameter count, from shapes alone: the matmul weights, two norms per layer
        and the final one, and the embedding table unless the head is that table."""
        norms = self.dim * (2 * self.n_layers + 1)
        embedding = 0 if self.tie_embeddings and not self.num_labels else self.vocab_size * self.dim
        return self.matmul_params() + norms + embedding

    def matmul_params(self) -> int:
        """Weights that multiply activations, the N of every model-FLOPs count (training MFU,
        the benchmarks, the AOT tool): per layer the q/k/v/o projections and the SwiGLU MLP,
        plus the output head, counted even when tied to the embedding (the lookup is a gather,
        not a matmul; the head is a matmul either way); a classifier's head is its `score`."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        return self.n_layers * (attn + mlp) + self.dim * (self.num_labels or self.vocab_size)

    def check_token_ids(self, ids: Any, what: str = "tokens") -> None:
        """Raise `ValueError` naming the first id outside [0, vocab_size) and where it is.

        Inside jit an out-of-range id gathers a clamped or NaN-filled embedding row and the
        logits silently become garbage, so every public entry point checks its ids here first.
        """
        ids = np.asarray(ids)
        bad = np.argwhere((ids < 0) | (ids >= self.vocab_size))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"{what}: token id {int(ids[where])} at index {list(where)} is out of range: "
                f"this model's vocab_size is {self.vocab_size} (ids 0..{self.vocab_size - 1})"
            )


# --- presets ---------------------------------------------------------------------------------

_PRESETS_FILE = Path(__file__).with_name("presets.json")
_BASE_KEY = "base"


@cache
def _preset_entries() -> dict[str, dict[str, Any]]:
    """`presets.json` with every entry's `base` chain resolved. An entry holds only what a
    checkpoint's config holds (its architecture); one may start from the fields of the entry
    its `base` names, and entries named `_...` exist only to be such bases."""
    raw = json.loads(_PRESETS_FILE.read_text())

    def resolved(name: str) -> dict[str, Any]:
        entry = dict(raw[name])
        base = entry.pop(_BASE_KEY, None)
        return {**resolved(base), **entry} if base else entry

    return {name: resolved(name) for name in raw}


@cache
def _preset_table() -> dict[str, dict[str, Any]]:
    """The named presets: every entry but the `_...` bases."""
    return {name: e for name, e in _preset_entries().items() if not name.startswith("_")}


def preset_names() -> list[str]:
    return sorted(_preset_table())


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A named preset from `presets.json`, with optional field overrides. Presets are
    architecture only: dtypes and remat keep `LlamaConfig`'s defaults (float32, none) until the
    code that runs the model (training, serving, the AOT tool) sets its own."""
    table = _preset_table()
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
    return LlamaConfig.from_dict({**table[name], **overrides})


# --- Meta params.json ------------------------------------------------------------------------


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return d[key]


def _meta_context_length(scaled_rope: bool) -> int:
    """The context length of a Meta checkpoint, which `params.json` does not hold (llama_models
    takes it from its caller; ModelArgs' 2048 is a KV-cache default, not the model's): the one
    Meta published for the Llama 3 generation the file's RoPE names, as HF's conversion script
    does: 3.1 and later (scaled RoPE) 131072, 3.0 8192, from the `_llama3.1` / `_llama3` bases."""
    return int(_preset_entries()["_llama3.1" if scaled_rope else "_llama3"]["max_seq_len"])


def from_meta_params(params: dict[str, Any] | str | Path, **overrides: Any) -> LlamaConfig:
    """Read Meta's `params.json` (dict or path).

    `use_scaled_rope` turns on Llama 3.1 scaling; its factor is `rope_scaling_factor` when present
    (Llama 3.2 1B/3B ship 32), else Meta's default of 8. The head is never tied: Meta's files
    always hold `output.weight`. Nor do they hold `max_seq_len`: it is `_meta_context_length`.
    """
    source = str(params) if not isinstance(params, dict) else "params.json"
    p = params if isinstance(params, dict) else _read_json(Path(params))
    dim = int(_require(p, "dim", source))
    n_heads = int(_require(p, "n_heads", source))
    vocab = int(_require(p, "vocab_size", source))
    if vocab <= 0:
        raise ConfigError(f"{source}: vocab_size must be positive (got {vocab})")
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(p.get("rope_scaling_factor", 8.0)),
            low_freq_factor=float(p.get("rope_low_freq_factor", 1.0)),
            high_freq_factor=float(p.get("rope_high_freq_factor", 4.0)),
            original_max_position=int(p.get("rope_original_max_position", 8192)),
        )
    fields = dict(
        dim=dim,
        n_layers=int(_require(p, "n_layers", source)),
        n_heads=n_heads,
        n_kv_heads=int(p.get("n_kv_heads") or n_heads),
        ffn_dim=meta_ffn_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")),
        vocab_size=vocab,
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=float(p.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(p.get("max_seq_len", _meta_context_length(scaling is not None))),
    )
    try:
        return LlamaConfig(**{**fields, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_meta_params(config: LlamaConfig) -> dict[str, Any]:
    """Meta `params.json` for `config`: the keys llama_models' ModelArgs reads, plus RoPE scaling
    values where Meta's own defaults would be wrong. FFN width is given by `multiple_of` (and
    `ffn_dim_multiplier` when needed) under Meta's formula. Meta has no key for tying (a tied
    model's Meta checkpoint holds `output.weight`, see `export.stored_model`) nor for the context
    length (Meta's loader passes its own `max_seq_len` next to these keys: a second one fails)."""
    p: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
    }
    p.update(_meta_ffn_fields(config.dim, config.ffn_dim))
    if config.rope_scaling is not None:
        s, meta = config.rope_scaling, RopeScaling()  # RopeScaling's defaults are Meta's values
        if s.factor != meta.factor:
            p["rope_scaling_factor"] = s.factor
        if dataclasses.replace(s, factor=meta.factor) != meta:  # any of the other three differ
            p["rope_low_freq_factor"] = s.low_freq_factor
            p["rope_high_freq_factor"] = s.high_freq_factor
            p["rope_original_max_position"] = s.original_max_position
    return p


def _meta_ffn_fields(dim: int, ffn_dim: int) -> dict[str, Any]:
    """Find `multiple_of` / `ffn_dim_multiplier` that reproduce `ffn_dim` under Meta's formula."""
    for multiple_of in (1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, multiple_of, None) == ffn_dim:
            return {"multiple_of": multiple_of}
    base = int(2 * (4 * dim) / 3)
    for multiple_of in (1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        for mult in (1.3, 1.5, 2.0, 1.2, 1.0, 4.0, 3.0):
            if meta_ffn_dim(dim, multiple_of, mult) == ffn_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    mult = ffn_dim / base
    if meta_ffn_dim(dim, 1, mult) == ffn_dim:
        return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise ConfigError(f"cannot express ffn_dim={ffn_dim} with Meta's formula for dim={dim}")


# --- Hugging Face config.json ----------------------------------------------------------------

SEQUENCE_CLASSIFIER = "LlamaForSequenceClassification"  # HF's class for `num_labels` > 0


def from_hf_config(config: dict[str, Any] | str | Path, **overrides: Any) -> LlamaConfig:
    """Read an HF `LlamaConfig` dict or `config.json`, v4 (`rope_theta` + `rope_scaling`) or v5
    (`rope_parameters`) form."""
    source = str(config) if not isinstance(config, dict) else "config.json"
    c = config if isinstance(config, dict) else _read_json(Path(config))
    model_type = c.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: model_type {model_type!r} is not 'llama'")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        scaling = None
    else:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not a Llama 3 architecture")
    n_heads = int(_require(c, "num_attention_heads", source))
    dim = int(_require(c, "hidden_size", source))
    num_labels = 0
    if SEQUENCE_CLASSIFIER in c.get("architectures", ()):  # HF's default is 2 labels
        num_labels = int(c.get("num_labels") or len(c.get("id2label") or {}) or 2)
    fields = dict(
        dim=dim,
        n_layers=int(_require(c, "num_hidden_layers", source)),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        head_dim=int(c.get("head_dim") or dim // n_heads),
        ffn_dim=int(_require(c, "intermediate_size", source)),
        vocab_size=int(_require(c, "vocab_size", source)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq_len=int(c.get("max_position_embeddings", 8192)),
        num_labels=num_labels,
    )
    try:
        return LlamaConfig(**{**fields, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_config(
    config: LlamaConfig,
    *,
    bos_token_id: int = 128000,
    eos_token_id: int | list[int] = 128001,
    torch_dtype: str = "float32",
    rope_format: str = "v4",
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """An HF `config.json` dict; `rope_format` "v4" writes `rope_theta`/`rope_scaling`,
    "v5" writes `rope_parameters`. A sequence classifier (`num_labels` > 0) is a
    `LlamaForSequenceClassification`, which finds each row's last token by `pad_token_id`."""
    rope: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    out: dict[str, Any] = {
        "architectures": [SEQUENCE_CLASSIFIER if config.num_labels else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings and not config.num_labels,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
    }
    if config.num_labels:
        out["num_labels"] = config.num_labels
        out["pad_token_id"] = pad_token_id
    if rope_format == "v5":
        out["rope_parameters"] = {**rope, "rope_theta": config.rope_theta}
    elif rope_format == "v4":
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = rope if config.rope_scaling is not None else None
    else:
        raise ConfigError(f"rope_format must be 'v4' or 'v5', got {rope_format!r}")
    return out
