"""`python -m llama_jax.train`: pretrain or fine-tune a Llama 3 model (see train/loop.py).

    python -m llama_jax.train --config tiny-arithmetic --checkpoint-dir runs/a
    python -m llama_jax.train --preset llama3.2-1b --init-from /ckpt/Llama3.2-1B --sft \\
        --data chats.jsonl --mesh fsdp=-1 --steps 1000 --checkpoint-dir gs://bucket/run

A checkpoint directory that already holds a checkpoint is resumed. Flags override the config
file; `--set section.key=value` overrides any other field (e.g. `--set optim.lr=1e-4`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llama_jax import compile_cache
from train.config import load_config, parse_assignments
from train.loop import PREEMPTED_EXIT_CODE, USER_ERRORS, run

# Flag -> (config key path, type). Every flag defaults to "not given" so the file's value stays.
FLAGS: dict[str, tuple[str, type]] = {
    "--preset": ("model", str),
    "--steps": ("steps", int),
    "--batch": ("data.batch", int),
    "--seq-len": ("data.seq_len", int),
    "--mesh": ("mesh", str),
    "--rules": ("rules", str),
    "--seed": ("seed", int),
    "--checkpoint-dir": ("checkpoint_dir", str),
    "--save-every": ("save_every", int),
    "--keep": ("keep", int),
    "--init-from": ("init_from", str),
    "--tokenizer": ("data.tokenizer", str),
    "--grad-accum": ("grad_accum", int),
    "--loss-chunks": ("loss_chunks", int),
    "--lr": ("optim.lr", float),
    "--log-every": ("log_every", int),
    "--export-dir": ("export_dir", str),
}


def parse_args(argv: list[str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(config file or name, nested overrides) from the command line."""
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", help="YAML file, or the name of one in configs/")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text/JSONL files, dirs or globs")
    p.add_argument("--sft", action="store_true", default=None, help="loss on assistant tokens only")
    for flag, (key, kind) in FLAGS.items():
        p.add_argument(flag, type=kind, metavar=key.split(".")[-1].upper())
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    overrides = parse_assignments(args.set)
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in FLAGS.items()}
    given["data.paths"] = args.data
    given["data.sft"] = args.sft
    for key, value in given.items():
        if value is not None:
            *parents, leaf = key.split(".")
            node = overrides
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    config_name, overrides = parse_args(argv)
    compile_cache.enable()
    try:
        result = run(load_config(config_name, overrides))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
