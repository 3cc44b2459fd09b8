"""Where tests find Meta's Llama 3 `tokenizer.model` (never copied into the project)."""

import importlib.util
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1].parent / "shared/assets/llama3"


def meta_tokenizer_path() -> Path | None:
    """Meta's tokenizer.model from the shared assets, else the copy inside `llama_models`."""
    if (ASSETS / "tokenizer.model").is_file():
        return ASSETS / "tokenizer.model"
    spec = importlib.util.find_spec("llama_models")
    if spec and spec.origin:
        shipped = Path(spec.origin).parent / "llama3/tokenizer.model"
        if shipped.is_file():
            return shipped
    return None
