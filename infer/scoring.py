"""Log-likelihood scoring of token windows: the core of the lm-eval backend and of perplexity.

A window is (context ids, continuation ids). Its score is the sum over the continuation of
log p(token | every token before it) and whether greedy decoding would have produced the whole
continuation. Windows are sorted by length and padded to power-of-two lengths in batches of a
fixed size, so a run compiles once per length bucket; each batch is one jitted forward on the
model's mesh, reduced on device, so only [batch] sums and flags reach the host and never the
[batch, time, vocab] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infer.engine import bucket
from llama_jax.config import LlamaConfig
from llama_jax.model import forward
from llama_jax.partitioning import BATCH, LENGTH
from sharding.rules import logical_to_sharding, split_size, with_rules

Window = tuple[Sequence[int], Sequence[int]]

# The shortest padded length: below it a new compile costs more than the padding.
MIN_BUCKET = 16


def _score(
    params: Any, tokens: jax.Array, targets: jax.Array, mask: jax.Array, *, config: LlamaConfig
) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked targets' log-probs, whether every masked target is the argmax)."""
    logits = forward(params, tokens, config=config)[0]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, logprobs, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


class Scorer:
    """Scores windows with `model` (a `llama_jax.Model`), at most `max_length` tokens of input
    each (default and cap: the model's context), `batch_size` windows per forward (rounded up
    to what the mesh's batch axes divide). `rules` are the sharding rules the params were
    placed with."""

    def __init__(
        self,
        model: Any,
        max_length: int | None = None,
        batch_size: int = 8,
        rules: str = "infer_tp",
    ) -> None:
        config = model.config
        self.max_length = min(max_length or config.max_seq_len, config.max_seq_len)
        fn: Callable[..., Any] = partial(_score, config=config)
        self.batch_size, self._sharding = batch_size, None
        if model.mesh is not None:
            split = split_size(BATCH, model.mesh, rules)
            self.batch_size = -(-batch_size // split) * split
            fn = with_rules(fn, model.mesh, rules)
            self._sharding = logical_to_sharding((BATCH, LENGTH), model.mesh, rules)
        self._params = model.params
        self._fn = jax.jit(fn)

    def _row(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
        """(input ids followed by the last target, continuation length): the window cut from
        the left to `max_length` inputs, as lm-eval's Hugging Face backend cuts it."""
        if not context:
            raise ValueError("a window needs at least one context token (e.g. BOS)")
        if not 0 < len(continuation) <= self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit a window of "
                f"{self.max_length}"
            )
        return [*context, *continuation][-(self.max_length + 1) :], len(continuation)

    def score(
        self, windows: Sequence[Window], on_batch: Callable[[int], Any] | None = None
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each window, in the order given. `on_batch(n)` is
        called after each batch of `n` windows (a progress bar's `update`)."""
        rows = [self._row(*w) for w in windows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = bucket(len(rows[chunk[0]][0]) - 1, MIN_BUCKET, self.max_length)
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros_like(tokens)
            mask = np.zeros(tokens.shape, bool)
            for r, i in enumerate(chunk):
                ids, n = rows[i]
                t = len(ids) - 1
                tokens[r, :t], targets[r, :t] = ids[:-1], ids[1:]
                mask[r, t - n : t] = True
            arrays = (tokens, targets, mask)
            if self._sharding is not None:
                arrays = tuple(jax.device_put(a, self._sharding) for a in arrays)
            sums, greedy = jax.device_get(self._fn(self._params, *arrays))
            for r, i in enumerate(chunk):
                out[i] = (float(sums[r]), bool(greedy[r]))
            if on_batch is not None:
                on_batch(len(chunk))
        return out


def stride_windows(ids: Sequence[int], max_length: int, stride: int) -> list[Window]:
    """Hugging Face's documented sliding-window perplexity: windows of `max_length` tokens
    starting every `stride` tokens, each scoring only the tokens the previous one did not
    (the first token of the sequence is never scored: nothing precedes it)."""
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((ids[begin:first], ids[first:end]))
        prev_end = end
        if end == len(ids):
            break
    return windows
