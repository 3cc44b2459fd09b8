"""`python -m llama_jax.post`: post-processing of inference outputs (code in `train/`).

Subcommands:
  to-sft   a prompts file and its `python -m llama_jax.infer --file ... --json` output -> chat
           JSONL for `python -m llama_jax.train --sft --data` (sequence-level distillation)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infer.tools import check_tools, with_tools
from train.generations import GenerationsError, to_sft


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.post",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True)
    sft = commands.add_parser(
        "to-sft", help="teacher generations -> chat SFT JSONL (sequence-level distillation)"
    )
    sft.add_argument("--prompts", required=True, help="the JSONL given to infer --file")
    sft.add_argument("--generations", required=True, help="infer --json's stdout, saved")
    sft.add_argument("--out", required=True, help="chat JSONL to write")
    sft.add_argument(
        "--keep-truncated",
        action="store_true",
        help="keep replies that ended by length (default: skip them)",
    )
    return p


def add_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tool definitions written into the prompt exactly as `python -m llama_jax.infer` did."""
    return with_tools(messages, check_tools(tools))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        counts = to_sft(args.prompts, args.generations, args.out, args.keep_truncated, add_tools)
    except GenerationsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = (
        f"; skipped {counts.truncated_skipped} that ended by length (--keep-truncated keeps them)"
        if counts.truncated_skipped
        else ""
    )
    print(f"wrote {counts.written} chats to {args.out}{skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
