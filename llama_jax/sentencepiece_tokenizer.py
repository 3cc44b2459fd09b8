"""SentencePiece tokenizers (Llama 1 and 2, llama2.c's stories models): a binary `.model` file.

Encoding and decoding are the `sentencepiece` package's own, so ids and text match it exactly; it
is an optional dependency (`pip install 'llama-jax[sentencepiece]'`) because Llama 3 does not
need it. Streaming follows its decoder piece by piece: '▁' is a space, `<0xHH>` byte-fallback
pieces are raw bytes, control tokens (<s>, </s>) are invisible, and the dummy-prefix space that
encoding put in front of the text is dropped again at its start. There is no chat format here:
Llama 3's needs header tokens these vocabularies lack, and Llama 2's [INST] prompts are not built.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax.tokenizer_base import StreamingDetokenizer, TokenizerError

INSTALL_HINT = "pip install 'llama-jax[sentencepiece]'"

# sentencepiece turns every byte of an invalid UTF-8 sequence into its own U+FFFD; Python's
# "replace" gives one per maximal invalid subsequence. Streams must match the package's decode.
PER_BYTE_REPLACE = "llama_jax.sentencepiece_per_byte"
codecs.register_error(PER_BYTE_REPLACE, lambda e: ("\ufffd" * (e.end - e.start), e.end))


def is_sentencepiece_model(path: Path) -> bool:
    """Whether `path` is a SentencePiece model rather than Llama 3's `tokenizer.model`.

    Both are often named `tokenizer.model`. SentencePiece's is a protobuf whose first field is
    its list of pieces (tag byte 0x0A) and holds binary floats and '▁'; Meta's Llama 3 file is
    ASCII lines of base64, so the first byte plus any non-ASCII byte tells them apart.
    """
    with path.open("rb") as f:
        head = f.read(1 << 16)
    return head[:1] == b"\n" and not head.isascii()


class SentencePieceTokenizer:
    """A SentencePiece model with the interface the engine, CLI and server use.

    `encode`/`decode`/`token_bytes`, `bos_id`, `eos_id`, `stop_tokens` (the end-of-sequence id,
    2 in Llama 2 style models), `n_words` and `detokenizer()` for streaming.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        try:
            import sentencepiece  # optional: only SentencePiece files need it
        except ImportError:
            raise TokenizerError(
                f"{self.path}: a SentencePiece tokenizer needs the sentencepiece package; "
                f"{INSTALL_HINT}"
            ) from None
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.path.read_bytes())
        except RuntimeError:
            raise TokenizerError(f"{self.path}: expected a SentencePiece model protobuf") from None
        self.n_words: int = self.processor.vocab_size()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.stop_tokens: tuple[int, ...] = (self.eos_id,) if self.eos_id >= 0 else ()
        self._is_byte = [self.processor.is_byte(i) for i in range(self.n_words)]
        self._bytes = [self._piece_bytes(i) for i in range(self.n_words)]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """sentencepiece's ids for `text`, behind BOS and before EOS when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        head = [self._special("BOS", self.bos_id)] if bos else []
        tail = [self._special("EOS", self.eos_id)] if eos else []
        return head + self.processor.encode(text) + tail

    def decode(self, ids: Sequence[int]) -> str:
        """sentencepiece's text: control tokens vanish, each invalid byte becomes U+FFFD."""
        return self.processor.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """What one token adds to the text away from its start ('▁' as a space)."""
        return self._bytes[token_id]

    def is_byte(self, token_id: int) -> bool:
        """Whether the token is a byte-fallback piece `<0xHH>`."""
        return self._is_byte[token_id]

    def detokenizer(self) -> SentencePieceDetokenizer:
        return SentencePieceDetokenizer(self)

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self.processor.id_to_piece(token_id)
        if self._is_byte[token_id]:
            return bytes([int(piece[3:5], 16)])  # "<0xHH>"
        if self.processor.is_control(token_id):
            return b""
        if self.processor.is_unknown(token_id):
            return self.processor.decode([token_id]).encode()  # the model's unk surface
        return piece.replace("▁", " ").encode()

    def _special(self, name: str, token_id: int) -> int:
        if token_id < 0:
            raise TokenizerError(f"{self.path}: the model has no {name} token")
        return token_id


class SentencePieceDetokenizer(StreamingDetokenizer):
    """Streams exactly `SentencePieceTokenizer.decode(all_ids)`.

    Until some text appears, sentencepiece decides what the ids so far spell (it drops the
    dummy-prefix '▁', and with `remove_extra_whitespaces` every leading one), so those ids are
    decoded by it. After that every piece is its bytes. Byte pieces are gathered into characters
    until a non-byte piece ends the run, as sentencepiece's decoder does.
    """

    errors = PER_BYTE_REPLACE

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self._before_text: list[int] | None = []  # ids that have spelled no text yet

    def add(self, token_id: int) -> str:
        if not self.tokenizer.is_byte(token_id):
            if self._before_text is not None:
                self._before_text.append(token_id)
                text = self.tokenizer.decode(self._before_text)
                if text:
                    self._before_text = None
                return text
            return self.finish() + super().add(token_id)
        self._before_text = None  # a byte piece always spells text (a character or U+FFFD)
        return super().add(token_id)
