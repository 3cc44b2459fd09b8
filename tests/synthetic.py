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


def ascii_share(samples: list) -> list[float]:
    """A reward with room to grow for an untrained byte-level model (about 1/4 by chance):
    the share of a completion's ids that are ASCII bytes (`python:synthetic:ascii_share`)."""
    return [sum(t < 128 for t in s.completion_ids) / max(len(s.completion_ids), 1) for s in samples]
