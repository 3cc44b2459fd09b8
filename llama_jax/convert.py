"""Convert a checkpoint: `python -m llama_jax.convert SRC DST --to hf|meta|orbax [--dtype bf16]`,
or check one on disk: `python -m llama_jax.convert --verify DIR` (one line per problem and a
summary; exit 1 when any is found).

SRC is any directory `llama_jax.load` reads (layout detected). Meta/HF to Meta/HF conversion
streams tensor by tensor from file to file without loading the model, so host memory stays near
one tensor whatever the model size; Orbax output, or Orbax/run-directory input, goes through
loaded params, as does `--merge-lora ADAPTER_DIR` (a PEFT LoRA adapter folded into the
weights before export). `--quantize int8|fp8` (with `--to orbax`) stores the weights quantized
(`llama_jax.quantize`); loading such a checkpoint restores them without quantizing again.
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
from llama_jax.checkpoint.verify import verify
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.quantize import MODES, as_quantized
from llama_jax.tokenizer import find_tokenizer

_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}


def _size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__)
    p.add_argument("src", type=Path, nargs="?",
                   help="Meta, Hugging Face, Orbax or training-run directory")  # fmt: skip
    p.add_argument("dst", type=Path, nargs="?", help="output directory (must be new or empty)")
    p.add_argument("--to", choices=("hf", "meta", "orbax"))
    p.add_argument("--verify", type=Path, metavar="DIR",
                   help="check the checkpoint in DIR instead of converting")  # fmt: skip
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--mp", type=int, default=1, help="model-parallel ranks of a Meta export")
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="HF shard size, e.g. 5GB")  # fmt: skip
    p.add_argument("--merge-lora", type=Path, metavar="ADAPTER_DIR",
                   help="merge this PEFT LoRA adapter into the weights")  # fmt: skip
    p.add_argument("--quantize", choices=tuple(MODES),
                   help="store projections and head quantized (--to orbax only)")  # fmt: skip
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
    quantize: str | None = None,
) -> Path:
    """Write the checkpoint at `src` as `to` at `dst`, with the PEFT adapter `merge_lora`
    merged in (in the stored dtype, before any cast to `dtype`), its weights quantized in
    `quantize` mode (Orbax only); returns `dst`."""
    out = param_dtype(dtype)
    kind, root = detect_layout(src)
    if quantize is not None:
        if to != "orbax":
            raise CheckpointError(f"--quantize needs --to orbax (got --to {to})")
        model = load(src, dtype=out, progress=progress)
        if merge_lora is not None:
            model = merge_into(model, merge_lora)
        model.params = as_quantized(model.params, model.config, quantize)
        return export(model, dst, to)
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


def _print_verified(path: Path) -> int:
    """`--verify`: one line per problem, then a summary; 0 when there is none."""
    kind, root, problems = verify(path)
    for line in problems:
        print(line)
    found = f"{len(problems)} problem(s) found" if problems else "no problems found"
    print(f"{root}: {kind} checkpoint, {found}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify is None and not (args.src and args.dst and args.to):
        parser.error("SRC, DST and --to are required (or --verify DIR alone)")
    if args.verify is not None and (args.src or args.dst or args.to):
        parser.error("--verify DIR takes no SRC, DST or --to")
    platforms.skip_absent_tpu()
    try:
        if args.verify is not None:
            return _print_verified(args.verify)
        dst = convert(
            args.src,
            args.dst,
            args.to,
            args.dtype,
            mp=args.mp,
            max_shard_bytes=args.max_shard_size,
            progress=False if args.no_progress else None,
            merge_lora=args.merge_lora,
            quantize=args.quantize,
        )
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
