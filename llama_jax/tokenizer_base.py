"""What every tokenizer shares: its error type and the streaming detokenizer over token bytes.

It sits below `llama_jax.tokenizer` (Llama 3) and `llama_jax.sentencepiece_tokenizer` (Llama 1/2)
so both build on it and the first can open files of the second without an import cycle.
"""

from __future__ import annotations

import codecs
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer file cannot be read or used; the one-line message names the file."""


class StreamingDetokenizer:
    """Turns ids arriving one at a time into text pieces for streaming output.

    A token can end in the middle of a UTF-8 character; those bytes are held back until the
    character completes, so no piece contains a broken sequence. Bytes that can never complete
    become U+FFFD exactly as `Tokenizer.decode` does, so the pieces (plus `finish()`) always
    concatenate to `decode(all_ids)`. Works with any tokenizer that has `token_bytes(id)`;
    subclasses change `errors` (how invalid bytes become U+FFFD) and `token_bytes`.
    """

    errors = "replace"  # one U+FFFD per maximal invalid subsequence, like tiktoken's decode

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=self.errors)

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text that is now complete (possibly empty)."""
        return self._utf8.decode(self.token_bytes(token_id))

    def finish(self) -> str:
        """End of stream: returns whatever is held back (U+FFFD for an incomplete character)."""
        return self._utf8.decode(b"", final=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one more id adds to the text."""
        return self.tokenizer.token_bytes(token_id)
