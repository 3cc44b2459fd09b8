"""Export to Hugging Face (config.json + sharded safetensors), Meta (params.json + one
`consolidated.NN.pth` per model-parallel rank) and our Orbax format.

HF and Meta exports pull tensors through a `layout.LayerGetter`, one layer at a time, from
either a loaded param tree or a not-yet-read source checkpoint; converting between files therefore
never holds more than one tensor in host memory.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from llama_jax.checkpoint import layout, orbax_io
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.load import param_dtype
from llama_jax.checkpoint.pth import write_pth
from llama_jax.checkpoint.safetensors_io import PlannedTensor, write_sharded
from llama_jax.config import LlamaConfig, to_hf_config, to_meta_params
from llama_jax.model import Params

Target = Literal["hf", "meta", "orbax"]
DEFAULT_SHARD_BYTES = 5 << 30


def _fresh_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: destination exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _out_dtype(config: LlamaConfig, dtype: np.dtype | None) -> np.dtype:
    return np.dtype(dtype) if dtype is not None else np.dtype(config.param_dtype)


def _copy_tokenizer(tokenizer: Any, dst: Path, to: Target) -> None:
    """Ship the model's tokenizer file where `find_tokenizer` looks for it in `to`'s layout."""
    src = getattr(tokenizer, "path", None)
    if src is None:
        return
    src = Path(src)
    if src.suffix == ".json":
        if to != "meta":  # Meta directories only carry the tiktoken `tokenizer.model`
            shutil.copyfile(src, dst / "tokenizer.json")
        return
    target = dst / "original" / "tokenizer.model" if to == "hf" else dst / "tokenizer.model"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(src, target)


def export_hf(
    config: LlamaConfig,
    get: layout.LayerGetter,
    dst: str | Path,
    dtype: np.dtype | None = None,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    pad_token_id: int | None = None,
) -> Path:
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads, or for a sequence
    classifier `LlamaForSequenceClassification`: it reads each row at its last token that is
    not `pad_token_id` (default: the tokenizer's pad id, which our data never holds)."""
    if config.num_labels and pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_id", None)
    dst = _fresh_dir(dst)
    out = _out_dtype(config, dtype)
    ids: dict[str, Any] = {"pad_token_id": pad_token_id}
    if tokenizer is not None and hasattr(tokenizer, "bos_id"):
        ids |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    hf_config = to_hf_config(config, torch_dtype=out.name, **ids)
    # Llama 3's defaults (or the tokenizer's ids), unless out of vocabulary
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf_config.get(key), int) and hf_config[key] >= config.vocab_size:
            hf_config[key] = None
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    def produce(spec: layout.TensorSpec, i: int | None) -> np.ndarray:
        return layout.to_torch(spec, config, "hf", get(spec, i)).astype(out, copy=False)

    planned = [
        PlannedTensor(name, layout.torch_shape_full(spec, config), out, partial(produce, spec, i))
        for name, spec, i in layout.tensor_names(config, "hf")
    ]
    write_sharded(dst, planned, max_shard_bytes)
    _copy_tokenizer(tokenizer, dst, "hf")
    return dst


def stored_model(
    config: LlamaConfig, get: layout.LayerGetter, to: Target
) -> tuple[LlamaConfig, layout.LayerGetter]:
    """The model as a `to` checkpoint stores it. Hugging Face ties the head by a config flag;
    Meta's format cannot (`llama_models` always builds an `output` layer and loads strictly), so
    a tied model goes to Meta untied, its `output.weight` a copy of the embeddings."""
    return layout.with_output_head(config, get) if to == "meta" else (config, get)


def _rank_tensors(config: LlamaConfig, get: layout.LayerGetter, out: np.dtype, mp: int, rank: int):
    for name, spec, x in layout.torch_tensors(config, get, "meta"):
        x = x.astype(out, copy=False)
        if spec.mp_dim is not None and mp > 1:
            x = np.split(x, mp, axis=spec.mp_dim)[rank]
        yield name, x


def export_meta(
    config: LlamaConfig,
    get: layout.LayerGetter,
    dst: str | Path,
    dtype: np.dtype | None = None,
    *,
    mp: int = 1,
    tokenizer: Any = None,
) -> Path:
    """A Meta directory: `params.json` and `mp` files `consolidated.NN.pth`, each tensor split
    along its model-parallel dim (Llama 3: embedding on the vocabulary dim)."""
    if config.num_labels:
        raise CheckpointError(f"{dst}: Meta's format holds no sequence classifier (score head)")
    config, get = stored_model(config, get, "meta")
    for field in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        if getattr(config, field) % mp:
            raise CheckpointError(
                f"{dst}: {field}={getattr(config, field)} not divisible by mp={mp}"
            )
    dst = _fresh_dir(dst)
    out = _out_dtype(config, dtype)
    (dst / "params.json").write_text(json.dumps(to_meta_params(config), indent=2) + "\n")
    for rank in range(mp):
        write_pth(dst / f"consolidated.{rank:02d}.pth", _rank_tensors(config, get, out, mp, rank))
    _copy_tokenizer(tokenizer, dst, "meta")
    return dst


def export_orbax(
    config: LlamaConfig,
    params: Params,
    dst: str | Path,
    dtype: np.dtype | None = None,
    *,
    tokenizer: Any = None,
) -> Path:
    """Our Orbax format (what `load` restores fastest onto a mesh)."""
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        config = config.replace(param_dtype=np.dtype(dtype).name)
    dst = _fresh_dir(dst)
    orbax_io.save_orbax(dst, config, params)
    _copy_tokenizer(tokenizer, dst, "orbax")
    return dst


def export_files(
    config: LlamaConfig,
    get: layout.LayerGetter,
    dst: str | Path,
    to: Target,
    dtype: np.dtype | None = None,
    *,
    mp: int = 1,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer: Any = None,
) -> Path:
    """`export_hf` or `export_meta`, chosen by `to`."""
    if to == "hf":
        return export_hf(
            config, get, dst, dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes
        )
    if to == "meta":
        return export_meta(config, get, dst, dtype, mp=mp, tokenizer=tokenizer)
    raise CheckpointError(f"{dst}: cannot write {to!r} from files (hf, meta)")


def export(
    model: Any,
    dst: str | Path,
    to: Target,
    dtype: Any = None,
    *,
    mp: int = 1,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a loaded `Model` as `to` ("hf", "meta" or "orbax") at `dst`, optionally cast to
    `dtype`; `mp` ranks for Meta, `max_shard_bytes` per HF shard."""
    out = param_dtype(dtype)
    if to == "orbax":
        return export_orbax(model.config, model.params, dst, out, tokenizer=model.tokenizer)
    get = layout.params_getter(model.params)
    return export_files(
        model.config, get, dst, to, out, mp=mp, max_shard_bytes=max_shard_bytes,
        tokenizer=model.tokenizer,
    )  # fmt: skip
