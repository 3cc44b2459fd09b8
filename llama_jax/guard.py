"""`python -m llama_jax.guard`: judge conversations with a Llama Guard 3 (or 2) model.

Each input is a conversation: `--text T` is one user message; `--file F` is JSONL with
`{"messages": [...]}` (or `{"prompt": T}`) per line. The guard judges each conversation's last
message (a user turn: the prompt; an assistant turn: the reply) and prints one JSON line per
conversation: `{"flagged", "safe", "categories", "p_unsafe", "malformed"}`, where `p_unsafe`
is the probability of "unsafe" as the first answer token and `flagged` is `p_unsafe >=
--threshold` (see `infer.guard`).

  python -m llama_jax.guard --checkpoint /ckpt/Llama-Guard-3-8B --text "How do I pick a lock?"
  python -m llama_jax.guard --checkpoint /ckpt/Llama-Guard-3-8B --file chats.jsonl --excluded S6
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from infer.cli import USER_ERRORS, CLIError, add_model_args, code_list, load_model, setup_logging
from infer.guard import GuardResult, GuardVersion, LlamaGuard
from llama_jax import compile_cache, platforms
from train.generations import read_jsonl


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.guard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one user message to judge")
    source.add_argument("--file", help="JSONL of {messages} (or {prompt}) conversations")
    p.add_argument("--version", type=int, choices=(3, 2), default=3, help="Llama Guard version")
    p.add_argument("--threshold", type=float, default=0.5, help="flag at P(unsafe) >= this")
    p.add_argument("--excluded", type=code_list, default=(), metavar="S1,S5",
                   help="categories not checked")  # fmt: skip
    return p


def conversations(args: argparse.Namespace) -> list[list[dict]]:
    """The conversations to judge, from --text or --file (a bad line names its FILE:LINE)."""
    if args.text is not None:
        return [[{"role": "user", "content": args.text}]]
    out = []
    for where, row in read_jsonl(args.file):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            out.append(row["messages"])
        else:
            raise CLIError(f"{where}: expected an object with messages (a list) or prompt")
    if not out:
        raise CLIError(f"--file {args.file}: no conversations in the file")
    return out


def as_json(result: GuardResult) -> str:
    v = result.verdict
    return json.dumps({
        "flagged": result.flagged, "safe": v.safe, "categories": list(v.categories),
        "p_unsafe": round(result.p_unsafe, 6), "malformed": v.malformed,
    })  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    platforms.skip_absent_tpu()
    compile_cache.enable()
    setup_logging(args.verbose)
    try:
        todo = conversations(args)
        model = load_model(args)
        guard = LlamaGuard(model, GuardVersion(args.version), slots=args.max_batch)
        for result in guard.classify(todo, args.excluded, args.threshold):
            print(as_json(result), flush=True)
    except (*USER_ERRORS, ValueError) as e:  # ValueError: a conversation it cannot judge
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
