"""The built-in synthetic corpus: single-digit addition and subtraction facts.

Small enough for a tiny model to learn in minutes on a CPU, and learning is easy to see: an
untrained model answers `7+8=` at random, a trained one says `15`. Each document is one fact,
`{"text": "7+8=15"}`; subtraction keeps results non-negative. Training reads it as the data
path `builtin:arithmetic`. (With the Llama 3 tokenizer every
number here is one token, so a fact is `<|begin_of_text|> 7 + 8 = 15 <|end_of_text|>`.)
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping


def facts() -> list[tuple[str, str]]:
    """Every (prompt, answer) pair: `("7+8=", "15")`, `("9-4=", "5")`, ..."""
    out = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    out += [(f"{a}-{b}=", str(a - b)) for a in range(10) for b in range(a + 1)]
    return out


HELD_OUT = "heldout"
SPLITS = ("all", "train", HELD_OUT)


def held_out(prompt: str) -> bool:
    """Whether a fact belongs to the held-out split: about one in five, by a fixed rule on its
    operands (never on its answer), so post-training on the rest can be judged on sums it never
    practised."""
    a, b = (int(x) for x in re.split(r"[+-]", prompt.rstrip("=")))
    return (3 * a + b) % 5 == 0


def split(name: str) -> list[tuple[str, str]]:
    """The (prompt, answer) facts of split `name`: "all", "train" or "heldout"."""
    if name not in SPLITS:
        raise ValueError(f"arithmetic split {name!r}: expected one of {', '.join(SPLITS)}")
    if name == "all":
        return facts()
    return [f for f in facts() if held_out(f[0]) == (name == HELD_OUT)]


def documents(n_docs: int = 20000, seed: int = 0) -> list[dict[str, str]]:
    """`n_docs` facts drawn uniformly with `seed`, as `{"text": "7+8=15"}` documents."""
    rng = random.Random(seed)
    table = facts()
    return [{"text": "".join(rng.choice(table))} for _ in range(n_docs)]


def score(completions: Mapping[str, str]) -> tuple[int, int]:
    """(right, total) for `{prompt: generated text}`; right when the text starts with the answer
    and is not followed by another digit."""
    answers = dict(facts())
    right = 0
    for prompt, text in completions.items():
        answer = answers[prompt]
        text = text.strip()
        right += text.startswith(answer) and not text[len(answer) : len(answer) + 1].isdigit()
    return right, len(completions)
