"""`python -m llama_jax.eval perplexity`: token-weighted perplexity of a text or JSONL file.

Each document (the whole text file, or each JSONL line's "text") is encoded with BOS and cut
into Hugging Face's sliding windows (`infer.scoring.stride_windows`); the result is one JSON
line: the scored token count, their mean negative log-likelihood and its exponential.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from infer.cli import USER_ERRORS, CLIError, Parser, load_model, positive
from infer.scoring import Scorer, stride_windows


def read_documents(path: Path) -> list[str]:
    """The documents of `path`: each line's "text" for `.jsonl`, else the whole file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--data {path}: cannot read ({e})") from None
    if path.suffix != ".jsonl":
        docs = [text]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"--data {path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise CLIError(f'--data {path}:{n}: expected an object with a "text" string')
            docs.append(doc["text"])
    if not any(docs):
        raise CLIError(f"--data {path}: no text")
    return docs


def perplexity(
    scorer: Scorer,
    documents: Sequence[Sequence[int]],
    stride: int,
    disable_progress: bool | None = None,
) -> dict[str, Any]:
    """{"tokens", "nll" (mean per scored token), "perplexity"} of token-id documents. The
    progress bar (on stderr) is tqdm's: `disable_progress=None` shows it on a terminal only."""
    windows = [w for ids in documents for w in stride_windows(ids, scorer.max_length, stride)]
    if not windows:
        raise CLIError("the documents have no token to score (each needs two or more)")
    with tqdm(
        total=len(windows), desc="scoring windows", unit="win", disable=disable_progress
    ) as bar:
        scores = scorer.score(windows, on_batch=bar.update)
    tokens = sum(len(cont) for _, cont in windows)
    nll = -sum(s for s, _ in scores) / tokens
    return {"tokens": tokens, "nll": nll, "perplexity": math.exp(nll)}


def parser() -> Parser:
    p = Parser(prog="llama_jax.eval perplexity", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (Meta, HF, Orbax, run)"
    )
    p.add_argument("--data", required=True, type=Path, help="a text file, or .jsonl of {'text'}")
    p.add_argument("--max-length", type=positive, help="window length (default: the model's)")
    p.add_argument("--stride", type=positive, help="tokens between windows (default: max length)")
    p.add_argument("--batch", type=positive, default=8, help="windows per forward (default 8)")
    p.add_argument("--mesh", help='device mesh, e.g. "tensor=4" or "data=2,tensor=4"')
    p.add_argument("--rules", default="infer_tp", help="sharding rule preset (default infer_tp)")
    p.add_argument("--dtype", help="cast parameters to float32 / bfloat16 / float16")
    p.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's own)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        docs = read_documents(args.data)
        model = load_model(argparse.Namespace(**vars(args), preset=None, lora=None, quantize=None))
        if model.tokenizer is None:
            raise CLIError(f"--checkpoint {args.checkpoint} has no tokenizer: pass --tokenizer")
        scorer = Scorer(model, args.max_length, args.batch, args.rules)
        stride = args.stride or scorer.max_length
        if stride > scorer.max_length:
            raise CLIError(f"--stride {stride} exceeds the window length {scorer.max_length}")
        ids = [model.tokenizer.encode(d, bos=True) for d in docs]
        result = perplexity(scorer, ids, stride)
    except USER_ERRORS as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(json.dumps(result), flush=True)
    return 0
