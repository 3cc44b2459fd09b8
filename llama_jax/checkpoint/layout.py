"""THE single mapping between Meta tensor names, Hugging Face tensor names and our param tree.

Each kind of tensor is described once in `SPECS`: our param path, its Meta and HF names, how its
torch `[out, in]` matrix maps onto our layout, and along which dim Meta's model-parallel ranks
split it. Import and export both derive from this table (`to_ours` is a lazy view, `to_torch`
its exact inverse), so the two directions cannot drift apart.

Rotary layout: Meta stores each q/k head's features as interleaved pairs (x0, x1), (x2, x3), ...;
HF and we store rotate-half order (x0, x2, ..., x1, x3, ...). `rope_perm` maps one to the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from llama_jax.checkpoint.lazy import View
from llama_jax.config import LlamaConfig
from llama_jax.model import param_shapes

Format = Literal["meta", "hf"]
# copy: same layout; linear: [out, in] -> [in, out]; heads_in: [H*hd, dim] -> [dim, H, hd];
# heads_out: [dim, H*hd] -> [H, hd, dim].
Kind = Literal["copy", "linear", "heads_in", "heads_out"]


@dataclass(frozen=True)
class TensorSpec:
    """One kind of tensor. `meta`/`hf` name templates hold `{i}` for the layer index;
    `mp_dim` is the torch dim Meta's model-parallel ranks split (None: replicated)."""

    path: tuple[str, ...]
    meta: str
    hf: str
    kind: Kind
    rope: bool = False  # q/k: permuted between Meta's interleaved and rotate-half layouts
    mp_dim: int | None = None

    @property
    def stacked(self) -> bool:
        """Stored in our tree with a leading `layers` axis."""
        return self.path[0] == "layers"

    def name(self, fmt: Format, layer: int | None = None) -> str:
        template = self.meta if fmt == "meta" else self.hf
        return template.format(i=layer) if self.stacked else template


def _layer(kind_path: str, meta: str, hf: str, kind: Kind, **kw) -> TensorSpec:
    return TensorSpec(
        ("layers", *kind_path.split("/")),
        f"layers.{{i}}.{meta}.weight",
        f"model.layers.{{i}}.{hf}.weight",
        kind,
        **kw,
    )


EMBEDDING = TensorSpec(
    ("tok_embeddings",), "tok_embeddings.weight", "model.embed_tokens.weight", "copy", mp_dim=0
)
OUTPUT = TensorSpec(("output",), "output.weight", "lm_head.weight", "linear", mp_dim=0)
# A sequence classifier's head (HF `LlamaForSequenceClassification`; Meta's format has none).
SCORE = TensorSpec(("score",), "score.weight", "score.weight", "linear")
SPECS: tuple[TensorSpec, ...] = (
    EMBEDDING,
    _layer("attention_norm", "attention_norm", "input_layernorm", "copy"),
    _layer(
        "attention/wq",
        "attention.wq",
        "self_attn.q_proj",
        "heads_in",
        rope=True,
        mp_dim=0,
    ),
    _layer(
        "attention/wk",
        "attention.wk",
        "self_attn.k_proj",
        "heads_in",
        rope=True,
        mp_dim=0,
    ),
    _layer("attention/wv", "attention.wv", "self_attn.v_proj", "heads_in", mp_dim=0),
    _layer("attention/wo", "attention.wo", "self_attn.o_proj", "heads_out", mp_dim=1),
    _layer("ffn_norm", "ffn_norm", "post_attention_layernorm", "copy"),
    _layer("feed_forward/w1", "feed_forward.w1", "mlp.gate_proj", "linear", mp_dim=0),
    _layer("feed_forward/w3", "feed_forward.w3", "mlp.up_proj", "linear", mp_dim=0),
    _layer("feed_forward/w2", "feed_forward.w2", "mlp.down_proj", "linear", mp_dim=1),
    TensorSpec(("norm",), "norm.weight", "model.norm.weight", "copy"),
    OUTPUT,
    SCORE,
)

# Tensors some checkpoints carry that hold nothing we need (recomputed rotary tables).
IGNORED = re.compile(r"(^rope\.freqs$)|(\.rotary_emb\.inv_freq$)")


def specs(config: LlamaConfig) -> tuple[TensorSpec, ...]:
    """The tensors a model with `config` has (no `output` when embeddings are tied, `score`
    only for a sequence classifier)."""
    return tuple(
        s
        for s in SPECS
        if not (s == OUTPUT and config.tie_embeddings)
        and not (s == SCORE and not config.num_labels)
    )


@cache
def _name_patterns(fmt: Format) -> tuple[tuple[re.Pattern[str], TensorSpec], ...]:
    out = []
    for s in SPECS:
        template = s.meta if fmt == "meta" else s.hf
        pattern = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(f"^{pattern}$"), s))
    return tuple(out)


def parse_name(name: str, fmt: Format) -> tuple[TensorSpec, int | None] | None:
    """(spec, layer index) of a checkpoint tensor name, or None if the name is unknown."""
    for pattern, s in _name_patterns(fmt):
        m = pattern.match(name)
        if m:
            return s, (int(m.group(1)) if s.stacked else None)
    return None


def rope_perm(head_dim: int) -> np.ndarray:
    """Index array: rotate-half feature k comes from Meta's interleaved feature rope_perm[k]."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def torch_shape_full(spec: TensorSpec, config: LlamaConfig) -> tuple[int, ...]:
    """One layer's shape in the torch `[out, in]` layout (all model-parallel ranks merged),
    derived from the model's own param shapes."""
    ours = tuple(param_at(param_shapes(config), spec.path).shape)[1 if spec.stacked else 0 :]
    if spec.kind == "copy":
        return ours
    if spec.kind == "linear":
        return ours[::-1]
    if spec.kind == "heads_in":
        dim, heads, hd = ours
        return (heads * hd, dim)
    heads, hd, dim = ours  # heads_out
    return (dim, heads * hd)


def _geometry(
    spec: TensorSpec, shape: tuple[int, ...], config: LlamaConfig, fmt: Format
) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """(split shape, axes, perm axis): ours = torch.reshape(split).transpose(axes), then gathered
    by `rope_perm` along the perm axis for Meta q/k."""
    hd = config.head_dim
    if spec.kind == "copy":
        return shape, tuple(range(len(shape))), None
    if spec.kind == "linear":
        return shape, (1, 0), None
    if spec.kind == "heads_in":
        split = (shape[0] // hd, hd, shape[1])
        return split, (2, 0, 1), (2 if spec.rope and fmt == "meta" else None)
    split = (shape[0], shape[1] // hd, hd)  # heads_out
    return split, (1, 2, 0), None


def our_axis(spec: TensorSpec, torch_dim: int) -> int:
    """The axis of our (per-layer) layout that torch dim `torch_dim` becomes."""
    return {
        "copy": (0, 1),
        "linear": (1, 0),
        "heads_in": (1, 0),
        "heads_out": (2, 0),
    }[spec.kind][torch_dim]


def to_ours(
    spec: TensorSpec,
    config: LlamaConfig,
    fmt: Format,
    source: Callable[[], np.ndarray],
    shape: tuple[int, ...],
    dtype: np.dtype,
) -> View:
    """A lazy view, in our per-layer layout, of a torch-layout tensor `source()` of `shape`."""
    split, axes, perm_axis = _geometry(spec, tuple(shape), config, fmt)
    perm = rope_perm(config.head_dim) if perm_axis is not None else None
    return View(source, np.dtype(dtype), split, axes, perm_axis, perm)


def to_torch(spec: TensorSpec, config: LlamaConfig, fmt: Format, x: np.ndarray) -> np.ndarray:
    """Exact inverse of `to_ours` for one layer's array `x` in our layout: contiguous, torch
    `[out, in]` layout, in `fmt`'s rotary order."""
    shape = torch_shape_full(spec, config)
    _, axes, perm_axis = _geometry(spec, shape, config, fmt)
    if perm_axis is not None:
        x = np.take(x, np.argsort(rope_perm(config.head_dim)), axis=perm_axis)
    return np.ascontiguousarray(np.transpose(x, np.argsort(axes)).reshape(shape))


def param_at(params: dict, path: tuple[str, ...]):
    """The leaf of a nested param dict at `path`."""
    for key in path:
        params = params[key]
    return params


# Gives one layer's array (or the whole unstacked param, layer None) in our layout.
LayerGetter = Callable[[TensorSpec, int | None], np.ndarray]


def params_getter(params: dict) -> LayerGetter:
    """A `LayerGetter` over a param tree: copies one layer of one param to the host per call."""

    def get(spec: TensorSpec, layer: int | None) -> np.ndarray:
        leaf = param_at(params, spec.path)
        return np.asarray(leaf if layer is None else leaf[layer])

    return get


def with_output_head(config: LlamaConfig, get: LayerGetter) -> tuple[LlamaConfig, LayerGetter]:
    """The same model with a head of its own, for formats that cannot tie one: a tied model
    becomes untied, its `output` the embedding table (in the head's `[dim, vocab]` layout), so it
    computes exactly the same logits."""
    if not config.tie_embeddings:
        return config, get

    def get_with_head(spec: TensorSpec, layer: int | None) -> np.ndarray:
        return get(EMBEDDING, None).T if spec == OUTPUT else get(spec, layer)

    return config.replace(tie_embeddings=False), get_with_head


def tensor_names(config: LlamaConfig, fmt: Format) -> Iterator[tuple[str, TensorSpec, int | None]]:
    """(name, spec, layer) of every tensor of a model with `config`, in checkpoint order."""
    for spec in specs(config):
        for i in range(config.n_layers) if spec.stacked else [None]:
            yield spec.name(fmt, i), spec, i


def torch_tensors(
    config: LlamaConfig, get: LayerGetter, fmt: Format
) -> Iterator[tuple[str, TensorSpec, np.ndarray]]:
    """(name, spec, torch-layout array) of every tensor in `fmt`, produced one at a time."""
    for name, spec, i in tensor_names(config, fmt):
        yield name, spec, to_torch(spec, config, fmt, get(spec, i))
