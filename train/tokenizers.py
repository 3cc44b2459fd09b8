"""Which tokenizer a run uses: Meta's Llama 3 BPE, a given file, or the byte-level tokenizer
(`llama_jax.tokenizer.ByteTokenizer`) for small-vocabulary models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llama_jax.tokenizer import BYTE_TOKENIZER, ByteTokenizer, Tokenizer

LLAMA3 = "llama3"
BYTES = BYTE_TOKENIZER


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
