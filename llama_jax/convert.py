"""Convert a checkpoint: `python -m llama_jax.convert SRC DST --to hf|meta|orbax [--dtype bf16]`.

SRC is any directory `llama_jax.load` reads (layout detected). Meta/HF to Meta/HF conversion
streams tensor by tensor from file to file without loading the model, so host memory stays near
one tensor whatever the model size; Orbax output, or Orbax/run-directory input, goes through
loaded params, as does `--merge-lora ADAPTER_DIR` (a PEFT LoRA adapter folded into the
weights before export).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from llama_jax import platforms
from llama_jax.checkpoint import layout, sources
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import (
    DEFAULT_SHARD_BYTES,
    Target,
    export,
    export_files,
    stored_model,
)
from llama_jax.checkpoint.load import detect_layout, load, param_dtype
from llama_jax.checkpoint.peft import merge_into
from llama_jax.checkpoint.placement import progress_bar
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.tokenizer import find_tokenizer

_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}


def _size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__)
    p.add_argument("src", type=Path, help="Meta, Hugging Face, Orbax or training-run directory")
    p.add_argument("dst", type=Path, help="output directory (must be new or empty)")
    p.add_argument("--to", required=True, choices=("hf", "meta", "orbax"))
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--mp", type=int, default=1, help="model-parallel ranks of a Meta export")
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="HF shard size, e.g. 5GB")  # fmt: skip
    p.add_argument("--merge-lora", type=Path, metavar="ADAPTER_DIR",
                   help="merge this PEFT LoRA adapter into the weights")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    return p


def _elements_per_rank(config: LlamaConfig, get: layout.LayerGetter, to: Target) -> int:
    """Elements an export to `to` reads for each file rank: every tensor the checkpoint stores,
    whole (a tied head stored by Meta is the embeddings read a second time)."""
    stored, _ = stored_model(config, get, to)
    return sum(
        math.prod(layout.torch_shape_full(spec, stored))
        for _, spec, _ in layout.tensor_names(stored, to)
    )


def convert(
    src: Path,
    dst: Path,
    to: str,
    dtype: str | None = None,
    *,
    mp: int = 1,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = None,
    merge_lora: Path | None = None,
) -> Path:
    """Write the checkpoint at `src` as `to` at `dst`, with the PEFT adapter `merge_lora`
    merged in (in the stored dtype, before any cast to `dtype`); returns `dst`."""
    out = param_dtype(dtype)
    kind, root = detect_layout(src)
    if merge_lora is not None:
        model = merge_into(load(src, progress=progress), merge_lora)
        return export(model, dst, to, out, mp=mp, max_shard_bytes=max_shard_bytes)
    if kind in ("meta", "hf") and to in ("hf", "meta"):
        source = sources.read_meta(root) if kind == "meta" else sources.read_hf(root)
        config = source.config.replace(param_dtype=source.dtype.name)
        ranks = mp if to == "meta" else 1  # a Meta export reads every tensor once per rank
        itemsize = (out or source.dtype).itemsize  # progress counts bytes as written
        total = ranks * _elements_per_rank(config, source.get, to) * itemsize
        with progress_bar(total, progress) as bar:

            def get(spec: layout.TensorSpec, layer: int | None) -> np.ndarray:
                x = source.get(spec, layer)
                bar.update(x.size * itemsize)
                return x

            tokenizer = find_tokenizer(root)
            return export_files(
                config,
                get,
                dst,
                to,
                out,
                mp=mp,
                max_shard_bytes=max_shard_bytes,
                tokenizer=tokenizer,
            )
    model = load(src, dtype=out, progress=progress)
    return export(model, dst, to, mp=mp, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    platforms.skip_absent_tpu()
    try:
        dst = convert(
            args.src,
            args.dst,
            args.to,
            args.dtype,
            mp=args.mp,
            max_shard_bytes=args.max_shard_size,
            progress=False if args.no_progress else None,
            merge_lora=args.merge_lora,
        )
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
