"""Which tokenizer a run uses: Meta's Llama 3 BPE, a given file, or a byte-level fallback.

The byte tokenizer exists for small-vocabulary models (the `tiny` presets have 512 ids: 256 bytes
plus the 256 Llama 3 special tokens in their usual order) and for machines without Meta's
`tokenizer.model`. It has the same attributes as `llama_jax.tokenizer.Tokenizer`, so the chat
format and the data pipeline use either unchanged.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer

LLAMA3 = "llama3"
BYTES = "bytes"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the 256 Llama 3 special tokens (ids 256..511)."""

    n_words = 256 + len(SPECIAL_TOKEN_NAMES)

    def __init__(self) -> None:
        self.special_tokens = {name: 256 + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        s = self.special_tokens
        self.bos_id = s["<|begin_of_text|>"]
        self.eos_id = s["<|end_of_text|>"]
        self.pad_id = s["<|finetune_right_pad_id|>"]
        self.start_header_id = s["<|start_header_id|>"]
        self.end_header_id = s["<|end_header_id|>"]
        self.eom_id = s["<|eom_id|>"]
        self.eot_id = s["<|eot_id|>"]
        self.python_tag_id = s["<|python_tag|>"]
        self.image_id = s["<|image|>"]
        self.stop_tokens = (self.eot_id, self.eom_id, self.eos_id)

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, allowed_special: Any = frozenset()
    ) -> list[int]:
        """UTF-8 bytes; special-token names listed in `allowed_special` (or "all") become their
        ids, as with `Tokenizer.encode`."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        ids = [self.bos_id] * bos
        pattern = "|".join(re.escape(name) for name in sorted(allowed))
        pos = 0
        for match in re.finditer(pattern, text) if pattern else ():
            ids += text[pos : match.start()].encode("utf-8")
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        return ids + list(text[pos:].encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(SPECIAL_TOKEN_NAMES[i - 256])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def meta_tokenizer_path() -> Path | None:
    """Meta's Llama 3 `tokenizer.model` as shipped inside the `llama-models` package, if any."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def load_tokenizer(spec: str) -> Tokenizer | ByteTokenizer:
    """`llama3` (Meta's file from `llama-models`), `bytes`, or a path to a tokenizer file."""
    if spec == BYTES:
        return ByteTokenizer()
    if spec == LLAMA3:
        path = meta_tokenizer_path()
        if path is None:
            raise FileNotFoundError(
                "tokenizer 'llama3': llama_models/llama3/tokenizer.model not found; "
                "pip install llama-models, pass --tokenizer PATH, or use --tokenizer bytes"
            )
        return Tokenizer(path)
    return Tokenizer(spec)
