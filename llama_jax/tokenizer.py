"""Llama 3 tokenizer over tiktoken: Meta's `tokenizer.model` or an HF `tokenizer.json`.

Both files describe the same byte-level BPE: Meta's as `<base64 bytes> <rank>` lines, HF's as a
vocab whose keys are bytes spelled with GPT-2's byte-to-unicode alphabet. Both are turned into
tiktoken mergeable ranks here (tiktoken merges by rank, so the ids are identical), and the 256
Llama 3 special tokens sit right after the base vocabulary (ids 128000..128255). A byte-level
tokenizer with the same special tokens serves small test models. SentencePiece files (Llama 1/2)
are read by `llama_jax.sentencepiece_tokenizer`; `open_tokenizer` tells the kinds apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken

from llama_jax.sentencepiece_tokenizer import SentencePieceTokenizer, is_sentencepiece_model
from llama_jax.tokenizer_base import StreamingDetokenizer, TokenizerError

# Llama 3 pre-tokenizer split pattern (same string in Meta's tokenizer and HF's tokenizer.json).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta encodes in chunks of at most this many characters (tiktoken used to panic above it) ...
MAX_ENCODE_CHARS = 400_000
# ... and cuts runs of whitespace / non-whitespace longer than this (tiktoken's regex is
# quadratic on them, openai/tiktoken#195). The cut points change ids, so they must match Meta's.
MAX_RUN_CHARS = 25_000

# A run longer than MAX_RUN_CHARS, matched only from its first character so the scan stays O(n).
# Python's `\s` is exactly `str.isspace()`, which is what Meta's splitter uses.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")

NUM_SPECIAL_TOKENS = 256
# Named special tokens in Llama 3.1 order; the rest are `<|reserved_special_token_{2+i}|>`.
_NAMED_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
SPECIAL_TOKEN_NAMES: tuple[str, ...] = _NAMED_SPECIAL + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL))
)

AllowedSpecial = Literal["all"] | set[str] | frozenset[str]

# Meta's Llama 3 base vocabulary; its special tokens follow it.
LLAMA3_BASE_VOCAB = 128_000


def special_token_ids(base: int) -> dict[str, int]:
    """Every special token's id when the base vocabulary has `base` ids (Llama 3's layout)."""
    return {name: base + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}


def _special_id(base: int, name: str) -> int:
    return base + SPECIAL_TOKEN_NAMES.index(name)


def _stop_ids(base: int) -> tuple[int, ...]:
    """<|eot_id|> ends a turn, <|eom_id|> a tool-call message, <|end_of_text|> the text."""
    return tuple(_special_id(base, n) for n in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))


def default_stop_ids(tokenizer: Any, vocab_size: int) -> tuple[int, ...]:
    """The tokenizer's stop tokens; without a tokenizer, Llama 3's ids when the vocabulary has
    Llama 3's base vocabulary and special-token block, else none."""
    if tokenizer is not None:
        return tuple(tokenizer.stop_tokens)
    if vocab_size >= LLAMA3_BASE_VOCAB + NUM_SPECIAL_TOKENS:
        return _stop_ids(LLAMA3_BASE_VOCAB)
    return ()


class _SpecialIds:
    """The named special-token ids, fixed by the Llama 3 layout: the base vocabulary's size
    plus the token's place in `SPECIAL_TOKEN_NAMES`."""

    def _name_special_ids(self, base: int) -> None:
        self.bos_id = _special_id(base, "<|begin_of_text|>")
        self.eos_id = _special_id(base, "<|end_of_text|>")
        self.pad_id = _special_id(base, "<|finetune_right_pad_id|>")
        self.start_header_id = _special_id(base, "<|start_header_id|>")
        self.end_header_id = _special_id(base, "<|end_header_id|>")
        self.eom_id = _special_id(base, "<|eom_id|>")
        self.eot_id = _special_id(base, "<|eot_id|>")
        self.python_tag_id = _special_id(base, "<|python_tag|>")
        self.image_id = _special_id(base, "<|image|>")
        self.stop_tokens: tuple[int, ...] = _stop_ids(base)


class Tokenizer(_SpecialIds):
    """Llama 3 BPE tokenizer with Meta's special tokens and long-input guards.

    `path` is Meta's `tokenizer.model` or, if it ends in `.json`, an HF `tokenizer.json`.
    Token ids of the special tokens are fixed by the Llama 3 layout (base vocabulary size plus
    offset), so the attributes below are the same for Llama 3.0 and 3.1 files.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        if self.path.suffix == ".json":
            ranks, self.special_tokens = _load_hf_json(self.path)
        else:
            ranks = _load_tiktoken_ranks(self.path)
            self.special_tokens = special_token_ids(len(ranks))
        self.encoding = tiktoken.Encoding(
            name=self.path.name,
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.encoding.n_vocab
        self._name_special_ids(len(ranks))

    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[int]:
        """Encode `text`; special-token text stays plain text unless listed in `allowed_special`.

        Long inputs are cut exactly where Meta's tokenizer cuts them, so ids match Meta's for any
        length while tiktoken only ever sees bounded pieces.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in _pieces(text):
            ids.extend(
                self.encoding.encode(piece, allowed_special=allowed_special, disallowed_special=())
            )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; special tokens become their names, invalid UTF-8 becomes U+FFFD."""
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (part of a UTF-8 character for some ids)."""
        return self.encoding.decode_single_token_bytes(token_id)

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming decoder of this tokenizer's ids."""
        return StreamingDetokenizer(self)


def _pieces(text: str) -> Iterator[str]:
    """Cut `text` into Meta's encode pieces: 400k-char chunks, runs of at most 25k chars."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        pos = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[pos:cut]
                pos = cut
        yield chunk[pos:]


def _check_dense(path: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken needs ranks 0..n-1; anything else is not a Llama 3 vocabulary."""
    if not ranks:
        raise TokenizerError(f"{path}: no BPE tokens found")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: expected BPE ranks to be exactly 0..{len(ranks) - 1}")


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `<base64 token bytes> <rank>` pair per line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError:
        raise TokenizerError(
            f"{path}: expected tiktoken BPE lines '<base64> <rank>', found non-ASCII bytes"
        ) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path}:{lineno}: expected tiktoken BPE line '<base64> <rank>', got {line[:60]!r}"
            ) from None
    _check_dense(path, ranks)
    return ranks


def _byte_alphabet() -> dict[int, int]:
    """GPT-2's stand-in character for each byte, as a `str.translate` table back to the byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are given the code points
    256, 257, ... in byte order, so every token's bytes can be spelled as a JSON-safe string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: b for b in printable}
    table.update({256 + i: b for i, b in enumerate(others)})
    return table


def _load_hf_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read an HF byte-level BPE `tokenizer.json` into tiktoken ranks and special tokens.

    The ranks are the vocab ids; merges are not needed because a Llama 3 vocab's merge order is
    its rank order. Added tokens (ids past the vocab) become the special tokens.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        added: list[dict[str, Any]] = data.get("added_tokens") or []
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise TokenizerError(
            f"{path}: expected an HF tokenizer.json with model.vocab and added_tokens"
        ) from None
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: expected a byte-level BPE model, got {model.get('type')!r}")
    for pattern in _regex_patterns(data.get("pre_tokenizer")):
        if pattern != PAT_STR:
            raise TokenizerError(
                f"{path}: expected the Llama 3 pre-tokenizer pattern, got {pattern!r}"
            )
    table = _byte_alphabet()
    try:
        if not {ord(c) for c in "".join(vocab)} <= table.keys():
            raise ValueError
        ranks = {tok.translate(table).encode("latin-1"): int(i) for tok, i in vocab.items()}
    except (ValueError, TypeError):
        raise TokenizerError(
            f"{path}: expected vocab keys in GPT-2 byte-level alphabet with int ids"
        ) from None
    _check_dense(path, ranks)
    try:
        special = {t["content"]: int(t["id"]) for t in added if int(t["id"]) >= len(ranks)}
    except (KeyError, ValueError, TypeError):
        raise TokenizerError(f"{path}: expected added_tokens entries with content and id") from None
    if special.get(SPECIAL_TOKEN_NAMES[0]) != len(ranks):
        raise TokenizerError(
            f"{path}: expected added token {SPECIAL_TOKEN_NAMES[0]} with id {len(ranks)}"
        )
    return ranks, special


def _regex_patterns(node: Any) -> Iterator[str]:
    """All `{"Regex": ...}` split patterns anywhere in an HF pre_tokenizer description."""
    if isinstance(node, dict):
        if isinstance(node.get("Regex"), str):
            yield node["Regex"]
        for value in node.values():
            yield from _regex_patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _regex_patterns(value)


# The tokenizers a checkpoint can come with.
TextTokenizer = Tokenizer | SentencePieceTokenizer


def open_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer in `path`, told apart by content, not name: a SentencePiece `.model`
    (Llama 1/2; a binary protobuf), else Meta's Llama 3 `tokenizer.model` or an HF
    `tokenizer.json`."""
    path = Path(path)
    if path.is_file() and is_sentencepiece_model(path):
        return SentencePieceTokenizer(path)
    return Tokenizer(path)


def find_tokenizer(checkpoint_dir: str | Path) -> TextTokenizer | None:
    """The tokenizer shipped with a checkpoint, or None if the directory has none.

    Looks, in order, for `tokenizer.model` (Meta's Llama 3 file or a Llama 1/2 SentencePiece
    model), an HF repo's `original/tokenizer.model`, then HF's `tokenizer.json`. A file that
    exists but is malformed raises rather than being skipped.
    """
    root = Path(checkpoint_dir)
    for rel in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (root / rel).is_file():
            return open_tokenizer(root / rel)
    return None


BYTE_TOKENIZER = "bytes"  # how configs, run directories and CLIs name `ByteTokenizer`


class ByteTokenizer(_SpecialIds):
    """UTF-8 bytes as ids 0..255, then the 256 Llama 3 special tokens (ids 256..511).

    For small-vocabulary models (the `tiny` presets have 512 ids) and machines without Meta's
    `tokenizer.model`. It has the attributes of `Tokenizer`, so the chat format and the data
    pipeline use either unchanged.
    """

    n_words = 256 + NUM_SPECIAL_TOKENS

    def __init__(self) -> None:
        self.special_tokens = special_token_ids(256)
        self._name_special_ids(256)

    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
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

    def token_bytes(self, token_id: int) -> bytes:
        """One id's bytes: the byte itself, or a special token's name (as `decode` spells it)."""
        return bytes([token_id]) if token_id < 256 else SPECIAL_TOKEN_NAMES[token_id - 256].encode()

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming decoder of these ids (what inference streams text with)."""
        return StreamingDetokenizer(self)
