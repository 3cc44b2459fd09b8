"""Synthetic training data the tests share: the arithmetic corpus as a JSONL file, and
preference pairs with a rule a tiny model can learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.corpus import documents


def arithmetic_jsonl(path: Path, n_docs: int) -> Path:
    """`n_docs` facts of the built-in corpus (seed 0) written as JSONL, so the file reader runs."""
    path.write_text("".join(json.dumps(d) + "\n" for d in documents(n_docs, seed=0)))
    return path


def rule_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Prompt: four letters and ':'; chosen repeats the last letter, rejected is another."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefgh"))
    out = []
    for _ in range(n):
        word = "".join(rng.choice(letters, 4))
        wrong = rng.choice([x for x in letters if x != word[-1]])
        out.append({"prompt": word + ":", "chosen": word[-1], "rejected": str(wrong)})
    return out
