"""Incremental text of a generation, cut at stop strings, safe to stream.

Text is released only once it can no longer turn into a stop string: a tail that is a prefix
of some stop string is held back until the next token settles it. So a stream never shows text
that the final answer (truncated before the stop string) does not contain.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_jax.tokenizer import TextTokenizer


class TextStream:
    """Feed generated ids with `add`; read the released text pieces it returns."""

    def __init__(self, tokenizer: TextTokenizer | None, stop: Sequence[str] = ()) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none")
        self._detok = tokenizer.detokenizer() if tokenizer is not None else None
        self._stop = tuple(stop)
        self._full = ""  # everything decoded so far
        self._released = 0
        self.text = ""  # the final text once stopped or finished
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Decode one more id; returns newly released text. Sets `stopped` at a stop string."""
        if self._detok is None or self.stopped:
            return ""
        return self._update(self._detok.add(token_id))

    def finish(self) -> str:
        """End of generation: release whatever was held back."""
        if self._detok is None or self.stopped:
            return ""
        piece = self._update(self._detok.finish())
        if self.stopped:
            return piece
        self.text = self._full
        rest = self._full[self._released :]
        self._released = len(self._full)
        return piece + rest

    def _update(self, piece: str) -> str:
        start = max(0, len(self._full) - max((len(s) for s in self._stop), default=0))
        self._full += piece
        hits = [i for i in (self._full.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self._full[: min(hits)]
            end = len(self.text)
        else:
            end = len(self._full) - self._held_back()
            self.text = self._full[:end]
        out = self._full[self._released : max(end, self._released)]
        self._released = max(end, self._released)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that some stop string starts with."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._full)), best, -1):
                if self._full.endswith(s[:n]):
                    best = n
                    break
        return best
