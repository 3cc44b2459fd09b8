"""OpenAI `response_format` by grammar-constrained decoding (llguidance).

`{"type": "json_object"}` allows any JSON object, `{"type": "json_schema", "json_schema":
{"schema": {...}, "strict": ...}}` exactly the documents of that schema. llguidance compiles
the schema into a grammar and, per request, a matcher walks it over token bytes and yields the
allowed next tokens as a packed bitmask: bit `i % 32` of int32 word `i // 32` is token `i`,
`ceil(V / 32)` words for a model vocabulary of `V` ids. Ids the tokenizer lacks (the model's
vocabulary may be padded past it) and special tokens are never allowed; the request's stop
tokens are allowed exactly when the document is complete, and are the only ones left once
nothing can follow it, so generation ends there.

How the engine uses it, per constrained row (unconstrained rows get an all-ones row and are
unchanged by `apply_bitmask`):

1. When the request starts: `Constraint(compile_response_format(text), tokenizer, vocab_size,
   stop_ids)`; the grammar is cached per `SamplingParams.response_format` text, the llguidance
   tokenizer per (tokenizer, vocab size).
2. Before each decode step: `constraint.fill_mask(bitmask[row])`, and the step runs
   `apply_bitmask(logits, bitmask)` before sampling.
3. After the step: `constraint.accept(token)`. False means the token broke the grammar (only
   possible if the mask was not applied): end the request with an error. A stop token is
   accepted only when the document is complete.

The mask for step t+1 depends on the token sampled at step t, so constrained rows cannot use
multi-step decode calls, and the host must read step t's tokens (and compute the next masks)
before it dispatches step t+1: no overlap of reading one step with dispatching the next for
those rows. A mask costs the host about 0.05-0.5 ms for the 128k Llama 3 vocabulary (a few ms
at worst), per constrained row and step.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import llguidance
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from llama_jax.tokenizer import SPECIAL_TOKEN_NAMES, ByteTokenizer, Tokenizer

# Compact JSON with fixed separators: random or weak models given flexible whitespace can emit
# whitespace without end, and one spelling of a document is all a client needs. A schema's own
# "x-guidance" options override these.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class ResponseFormatError(ValueError):
    """The request's response_format cannot be used; `reason` completes "response_format ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"response_format {reason}")
        self.reason = reason


def canonical_response_format(response_format: Mapping[str, Any] | None) -> str | None:
    """The request's response_format as compact JSON text; None for none or `{"type": "text"}`.

    The text keeps the client's key order (a schema's property order is the order the model
    writes the properties in), so equal requests give equal text and a hashable setting.
    `SamplingParams` checks that it compiles.
    """
    if response_format is None or response_format.get("type") == "text":
        return None
    return json.dumps(response_format, separators=(",", ":"), ensure_ascii=False)


def compile_response_format(response_format: Mapping[str, Any] | str) -> str:
    """The llguidance grammar of a json_object / json_schema response_format (dict or JSON text).

    Raises ResponseFormatError (a ValueError) with one line naming what is wrong.
    """
    if isinstance(response_format, str):
        return _compile_text(response_format)
    return _compile_text(json.dumps(response_format, separators=(",", ":"), ensure_ascii=False))


@functools.lru_cache(maxsize=256)
def _compile_text(text: str) -> str:
    """Cached by text: every request of a client usually sends the same schema."""
    try:
        response_format = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResponseFormatError(f"is not valid JSON: {e}") from None
    if not isinstance(response_format, dict):
        raise ResponseFormatError(f"must be an object, got {response_format!r}")
    kind = response_format.get("type")
    if kind == "json_object":
        schema: Any = ANY_JSON_OBJECT
        lenient = False
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ResponseFormatError("json_schema must be an object with a 'schema'")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ResponseFormatError(f"json_schema.schema must be an object, got {schema!r}")
        # strict=false promises no more than best effort: keywords llguidance cannot enforce
        # are ignored rather than refused (an invalid schema is still refused).
        lenient = not spec.get("strict", False)
    else:
        raise ResponseFormatError(f"type must be json_object, json_schema or text; got {kind!r}")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={**JSON_OPTIONS, "lenient": lenient}
    )
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        error = " ".join(error.split())  # one line
        raise ResponseFormatError(f"json_schema.schema is invalid or unsupported: {error}")
    return grammar


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one bitmask row for a vocabulary of `vocab_size` ids."""
    return (vocab_size + 31) // 32


def allow_all(rows: int, vocab_size: int) -> np.ndarray:
    """A [rows, words] bitmask that allows every token (unconstrained rows)."""
    return np.full((rows, bitmask_words(vocab_size)), -1, np.int32)


@functools.lru_cache(maxsize=8)
def lltokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` over a model vocabulary of `vocab_size` ids.

    Cached: building it walks every token (about a second for Llama 3's 128k). Model ids past
    the tokenizer's are padding that no grammar ever allows. Its EOS tokens are the
    tokenizer's stop tokens; `Constraint` swaps in the request's own.
    """
    if vocab_size < tokenizer.n_words:
        raise ValueError(
            f"model vocabulary ({vocab_size}) is smaller than the tokenizer's ({tokenizer.n_words})"
        )
    eos = list(tokenizer.stop_tokens)
    if isinstance(tokenizer, Tokenizer):
        return lltokenizer_from_encoding(tokenizer.encoding, n_vocab=vocab_size, eos_token=eos)
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [bytes([i]) for i in range(256)] + [n.encode() for n in SPECIAL_TOKEN_NAMES]
        special = set(range(256, tokenizer.n_words))
    else:  # SentencePiece: control tokens spell nothing
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_words)]
        special = {i for i, b in enumerate(tokens) if not b}
    special |= {*eos, tokenizer.bos_id}
    # llguidance takes the vocabulary size from the token list here, so pad it.
    tokens += [b""] * (vocab_size - len(tokens))
    special |= set(range(tokenizer.n_words, vocab_size))
    wrapper = llguidance.TokenizerWrapper(_TokenList(tokenizer, tokens, sorted(special)))
    return llguidance.LLTokenizer(wrapper, eos_token=eos)


class _TokenList:
    """The token table `llguidance.TokenizerWrapper` reads; calling it tokenizes bytes.

    llguidance tokenizes the bytes a grammar forces and allows the first of those tokens, so
    the tokenization must spell exactly those bytes: SentencePiece's own `encode` would put
    its dummy-prefix space in front. Greedy longest match over the table spells them exactly
    (a byte no token spells cannot be in any document, and is skipped).
    """

    def __init__(self, tokenizer: Any, tokens: list[bytes], special: list[int]) -> None:
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        skip = set(special)
        self._ids: dict[bytes, int] = {}
        for i, b in enumerate(tokens):
            if i not in skip:
                self._ids.setdefault(b, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids, pos = [], 0
        while pos < len(data):
            for end in range(min(len(data), pos + self._longest), pos, -1):
                if (i := self._ids.get(data[pos:end])) is not None:
                    ids.append(i)
                    pos = end
                    break
            else:
                pos += 1
        return ids


class Constraint:
    """One request's walk through its grammar: the next allowed tokens, and the tokens taken.

    `stop_ids` are the request's stop tokens: allowed whenever the document is complete, the
    only tokens allowed once nothing more can follow it.
    """

    def __init__(
        self, grammar: str, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]
    ) -> None:
        if not stop_ids:
            raise ValueError("response_format needs a stop token to end the document with")
        if not all(0 <= t < vocab_size for t in stop_ids):
            raise ValueError(f"stop token ids must be in [0, {vocab_size}), got {list(stop_ids)}")
        tok = lltokenizer(tokenizer, vocab_size)
        self._matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if self._matcher.is_error():
            raise ResponseFormatError(f"cannot be used: {self._matcher.get_error()}")
        self.vocab_size = vocab_size
        self._stop = frozenset(int(t) for t in stop_ids)
        self._stop_idx = np.array(sorted(self._stop), np.int64)
        self._eos_idx = np.array(tok.eos_tokens, np.int64)

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into `out` (int32 [ceil(V/32)], C-contiguous).

        In an error state (a token the mask forbade was accepted) only the stop tokens are
        allowed, so the request ends.
        """
        if out.dtype != np.int32 or out.shape != (bitmask_words(self.vocab_size),):
            raise ValueError(
                f"mask row must be int32 [{bitmask_words(self.vocab_size)}], "
                f"got {out.dtype} {list(out.shape)}"
            )
        if not out.flags["C_CONTIGUOUS"]:
            raise ValueError("mask row must be C-contiguous")
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        words = out.view(np.uint32)
        _set_bits(words, self._eos_idx, False)
        if self._matcher.is_error():
            words[:] = 0
        if self._matcher.is_accepting() or self._matcher.is_error():
            _set_bits(words, self._stop_idx, True)

    def mask(self) -> np.ndarray:
        """The allowed next tokens as a fresh int32 [ceil(V/32)] row."""
        out = np.empty(bitmask_words(self.vocab_size), np.int32)
        self.fill_mask(out)
        return out

    def accept(self, token_id: int) -> bool:
        """Take the sampled token; False if the grammar does not allow it here."""
        token_id = int(token_id)
        if token_id in self._stop and self._matcher.is_accepting():
            return True
        return self._matcher.consume_token(token_id)

    def is_done(self) -> bool:
        """The document is complete and nothing can follow it: only a stop token is allowed."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str:
        """Why the matcher failed (empty while it has not)."""
        return self._matcher.get_error()


def _set_bits(words: np.ndarray, ids: np.ndarray, value: bool) -> None:
    bits = np.left_shift(np.uint32(1), (ids % 32).astype(np.uint32))
    if value:
        np.bitwise_or.at(words, ids // 32, bits)
    else:
        np.bitwise_and.at(words, ids // 32, ~bits)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Disallowed tokens' logits (a 0 bit in the int32 [B, ceil(V/32)] mask) become -inf.

    Pure jnp, for the jitted decode step; an all-ones row leaves its logits unchanged.
    """
    batch, vocab = logits.shape
    if bitmask.shape != (batch, bitmask_words(vocab)):
        raise ValueError(
            f"bitmask must be [{batch}, {bitmask_words(vocab)}] for logits "
            f"[{batch}, {vocab}], got {list(bitmask.shape)}"
        )
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask.astype(jnp.int32)[:, :, None] >> shifts) & 1
    allowed = bits.reshape(batch, -1)[:, :vocab].astype(bool)
    return jnp.where(allowed, logits, jnp.array(-jnp.inf, logits.dtype))
