"""Per-request sampling settings and the sampler that runs inside the jitted decode step.

Every decode slot carries its own settings as device arrays (`SlotParams`), so one compiled
step serves greedy and sampled requests side by side. Randomness is keyed by (request seed,
token position), never by batch composition: a seeded request gives the same tokens alone or
sharing a batch. Before sampling, `edit_logits` applies penalties and logit_bias in vLLM's
order: repetition penalty (over prompt and generated tokens), frequency and presence penalties
(over generated tokens), then the bias. Filters then follow Hugging Face's order: temperature,
then top-k, top-p on what top-k left, and min-p (relative to the most likely token, so
unaffected by the earlier cuts).
Everything here runs over the full vocabulary every step, so it avoids what is slow there on
CPU: sorting, `argmax`'s paired reduction, and threefry random bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infer.grammar import ResponseFormatError, compile_response_format

MAX_TOP_LOGPROBS = 20  # OpenAI's bound; the step computes exactly this many when any are asked
MAX_SEED = 2**32 - 1
CANDIDATES = 64  # top-k / top-p cuts are looked for among this many largest logits first
NO_LOGPROBS = -1
MAX_LOGIT_BIAS = 300  # OpenAI's bound on logit_bias entries; the per-slot arrays have this width
MAX_PENALTY = 2.0  # OpenAI's bound on |presence_penalty| and |frequency_penalty|
MAX_BIAS = 100.0  # OpenAI's bound on |logit_bias value|


class SamplingError(ValueError):
    """A sampling setting is out of range; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request. `temperature == 0` is greedy (argmax); `top_k == 0`,
    `top_p == 1` and `min_p == 0` switch those filters off. `stop_token_ids=None` means the
    model's defaults (`<|eot_id|>`, `<|eom_id|>`, `<|end_of_text|>` for Llama 3).
    `response_format` is the OpenAI response_format as JSON text (a dict would not hash), None
    for free text; `infer.grammar` turns it into the constraint on every token.
    `presence_penalty` and `frequency_penalty` (OpenAI's, 0 = off) count generated tokens only;
    `repetition_penalty` (Hugging Face's, 1 = off) covers the prompt too. `logit_bias` maps
    token ids to additive biases; a dict is accepted and stored as a sorted tuple of pairs so
    the settings stay hashable. Its ids are checked against a vocabulary by `check_vocab`,
    since the model is not known here."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        integer, number = numbers.Integral, numbers.Real
        checks = (
            ("max_new_tokens", integer, lambda x: x >= 1, "an integer >= 1"),
            ("temperature", number, lambda x: 0.0 <= x < math.inf, "a number >= 0"),
            ("top_k", integer, lambda x: x >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", number, lambda x: 0.0 < x <= 1.0, "a number in (0, 1]"),
            ("min_p", number, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]"),
            ("seed", integer, lambda x: 0 <= x <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
            ("top_logprobs", integer, lambda x: 0 <= x <= MAX_TOP_LOGPROBS, "in [0, 20]"),
            ("presence_penalty", number, lambda x: abs(x) <= MAX_PENALTY, "a number in [-2, 2]"),
            ("frequency_penalty", number, lambda x: abs(x) <= MAX_PENALTY, "a number in [-2, 2]"),
            ("repetition_penalty", number, lambda x: 0.0 < x < math.inf, "a number > 0"),
        )
        for name, types, ok, expected in checks:
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
                raise SamplingError(name, f"must be {expected}, got {value!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise SamplingError("stop", f"must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise SamplingError("stop_token_ids", f"must be integers, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if self.response_format is not None:
            if not isinstance(self.response_format, str):
                raise SamplingError(
                    "response_format", f"must be JSON text, got {self.response_format!r}"
                )
            try:
                compile_response_format(self.response_format)  # cached by text
            except ResponseFormatError as e:
                raise SamplingError("response_format", e.reason) from None
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise SamplingError("logit_bias", ...) for a biased token id >= `vocab_size`: the
        sampler's scatter would silently drop it, so a typo'd id must be refused up front."""
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise SamplingError(
                    "logit_bias",
                    f"token id {token} is out of range: the vocab_size is {vocab_size}",
                )


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` (a dict or (id, bias) pairs) as sorted (int, float) pairs, or SamplingError."""
    try:
        pairs = list(bias.items() if isinstance(bias, dict) else bias)
        if not all(len(pair) == 2 for pair in pairs):
            raise TypeError
    except TypeError:
        raise SamplingError("logit_bias", f"must map token ids to numbers, got {bias!r}") from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise SamplingError("logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries")
    for token, value in pairs:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise SamplingError("logit_bias", f"token ids must be integers >= 0, got {token!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not abs(value) <= MAX_BIAS
        ):
            raise SamplingError(
                "logit_bias", f"values must be numbers in [-100, 100], got {value!r} for {token}"
            )
    out = tuple(sorted((int(t), float(v)) for t, v in pairs))
    if len({t for t, _ in out}) != len(out):
        raise SamplingError("logit_bias", "has a token id more than once")
    return out


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded with `seed`. Choice 0 keeps the seed, so
    `n=1` samples as before; the others hash (seed, choice), so seeded choices repeat exactly
    yet differ from each other (one shared seed would make all n the same text)."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The settings of the `n` choices of one request (the server's `n`, `generate`'s `n`):
    seeded, choice i gets `choice_seed(seed, i)`; unseeded, all share `params` and the
    scheduler gives each its own random seed."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]


class SlotParams(NamedTuple):
    """Sampling settings of each decode slot, as arrays with a leading slot axis."""

    temperature: jax.Array  # float32 [S]; 0 = greedy
    top_k: jax.Array  # int32 [S]; 0 = off
    top_p: jax.Array  # float32 [S]; 1 = off
    min_p: jax.Array  # float32 [S]; 0 = off
    seed: jax.Array  # uint32 [S]
    presence_penalty: jax.Array  # float32 [S]; 0 = off
    frequency_penalty: jax.Array  # float32 [S]; 0 = off
    repetition_penalty: jax.Array  # float32 [S]; 1 = off
    # logit_bias, sparse: a dense [S, V] bias would be copied to the device on every change of
    # a slot's settings; 300 pairs per slot are what OpenAI allows.
    bias_ids: jax.Array  # int32 [S, MAX_LOGIT_BIAS]; -1 pads
    bias_values: jax.Array  # float32 [S, MAX_LOGIT_BIAS]; 0 pads

    @classmethod
    def host(cls, rows: list[tuple[SamplingParams, int]]) -> SlotParams:
        """numpy arrays for (settings, resolved seed) rows."""
        bias_ids = np.full((len(rows), MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((len(rows), MAX_LOGIT_BIAS), np.float32)
        for row, (p, _) in enumerate(rows):
            for col, (token, value) in enumerate(p.logit_bias):
                bias_ids[row, col], bias_values[row, col] = token, value
        return cls(
            np.array([p.temperature for p, _ in rows], np.float32),
            np.array([p.top_k for p, _ in rows], np.int32),
            np.array([p.top_p for p, _ in rows], np.float32),
            np.array([p.min_p for p, _ in rows], np.float32),
            np.array([seed for _, seed in rows], np.uint32),
            np.array([p.presence_penalty for p, _ in rows], np.float32),
            np.array([p.frequency_penalty for p, _ in rows], np.float32),
            np.array([p.repetition_penalty for p, _ in rows], np.float32),
            bias_ids,
            bias_values,
        )


class TokenHistory(NamedTuple):
    """What each slot has seen, for the penalties: dense over the vocabulary so that applying
    them is one elementwise pass (no gather of a variable-length token list in the step)."""

    counts: jax.Array  # int32 [S, V]; how often each token was generated
    prompt: jax.Array  # bool [S, V]; the token occurs in the prompt

    @staticmethod
    def zeros(rows: int, vocab: int) -> TokenHistory:
        """Nothing seen yet."""
        return TokenHistory(jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool))

    def record(self, tokens: jax.Array, real: jax.Array, generated: jax.Array) -> TokenHistory:
        """This history with a chunk of `tokens` [S, T] recorded where `real` [S, T] (the rest is
        padding): prompt tokens marked seen, `generated` ones (a sequence recomputed after
        preemption) counted."""
        vocab = self.counts.shape[1]
        rows = jnp.arange(tokens.shape[0])[:, None]

        def ids(keep: jax.Array) -> jax.Array:
            return jnp.where(keep, tokens, vocab)  # out of range: dropped by the scatter

        return TokenHistory(
            self.counts.at[rows, ids(real & generated)].add(1, mode="drop"),
            self.prompt.at[rows, ids(real & ~generated)].set(True, mode="drop"),
        )

    def add(self, tokens: jax.Array, active: jax.Array) -> TokenHistory:
        """This history with `tokens` [S] counted as generated where `active` [S]."""
        rows = jnp.arange(tokens.shape[0])
        return self._replace(counts=self.counts.at[rows, tokens].add(active.astype(jnp.int32)))


def edit_logits(logits: jax.Array, p: SlotParams, history: TokenHistory) -> jax.Array:
    """float32 `logits` [S, V] after each row's penalties and logit_bias, in vLLM's order.

    Repetition penalty divides positive logits of every token seen (prompt or generated) by r
    and multiplies negative ones by r, so either way the token gets less likely. Then
    `logit -= frequency_penalty * count + presence_penalty * (count > 0)` over generated
    tokens, and the bias is added. Each edit is a pass over [S, V] (128k wide for Llama 3)
    every decode step, so it is skipped when no row uses it; rows that do not use it are left
    unchanged by its neutral value (r = 1, penalties 0, no bias ids).
    """

    def repetition(x: jax.Array) -> jax.Array:
        seen = history.prompt | (history.counts > 0)
        r = p.repetition_penalty[:, None]
        return jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)

    def frequency_presence(x: jax.Array) -> jax.Array:
        counts = history.counts.astype(jnp.float32)
        return (
            x
            - p.frequency_penalty[:, None] * counts
            - p.presence_penalty[:, None] * (counts > 0).astype(jnp.float32)
        )

    def bias(x: jax.Array) -> jax.Array:
        used = p.bias_ids >= 0
        ids = jnp.where(used, p.bias_ids, x.shape[1])  # padding: out of range, dropped
        rows = jnp.arange(x.shape[0])[:, None]
        return x.at[rows, ids].add(jnp.where(used, p.bias_values, 0.0), mode="drop")

    def unchanged(x: jax.Array) -> jax.Array:
        return x

    logits = jax.lax.cond(jnp.any(p.repetition_penalty != 1.0), repetition, unchanged, logits)
    penalised = jnp.any((p.frequency_penalty != 0.0) | (p.presence_penalty != 0.0))
    logits = jax.lax.cond(penalised, frequency_presence, unchanged, logits)
    return jax.lax.cond(jnp.any(p.bias_ids >= 0), bias, unchanged, logits)


class Sampled(NamedTuple):
    """One sampled token per row, its log-probability under the logits `sample` was given
    (before temperature and any filter), and the `n_top` most likely alternatives (empty
    trailing axis when not asked for)."""

    tokens: jax.Array  # int32 [B]
    logprobs: jax.Array  # float32 [B]
    top_ids: jax.Array  # int32 [B, n_top]
    top_logprobs: jax.Array  # float32 [B, n_top]


def filter_logits(logits: jax.Array, p: SlotParams) -> jax.Array:
    """Temperature-scaled logits with everything outside each row's kept set at -inf.

    top-k keeps the k largest; top-p keeps, of what top-k kept, the most likely tokens until
    their mass reaches p; min-p keeps tokens with prob >= min_p * max prob. Each cut is a
    threshold, so tokens tied with the last one kept are kept too (as in Hugging Face's top-k).
    """
    scaled = _scale(logits, p)
    return jnp.where(_keep(scaled, p), scaled, -jnp.inf)


def _scale(logits: jax.Array, p: SlotParams) -> jax.Array:
    return logits / jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]


def _keep(scaled: jax.Array, p: SlotParams) -> jax.Array:
    """[B, V] mask of the tokens `filter_logits` keeps, for temperature-scaled logits."""
    peak = jnp.max(scaled, axis=-1, keepdims=True)
    active = jnp.any(((p.top_k > 0) & (p.top_k < scaled.shape[1])) | (p.top_p < 1.0))
    cut = jax.lax.cond(active, _top_k_top_p_cut, lambda *_: jnp.full_like(peak, -jnp.inf),
                       scaled, peak, p)  # fmt: skip
    return (scaled >= cut) & (scaled - peak >= jnp.log(p.min_p)[:, None])


def _top_k_top_p_cut(scaled: jax.Array, peak: jax.Array, p: SlotParams) -> jax.Array:
    """[B, 1] lowest kept logit under top-k then top-p (-inf where both are off).

    A full-vocabulary sort is far too slow (hundreds of ms on CPU for 128k entries), so the
    cuts are read off the CANDIDATES largest logits; rows whose cut lies beyond them (top-k >
    CANDIDATES, or a flat distribution whose top-p mass is spread wider) fall back to an exact
    bisection over the whole vocabulary, run only when some row needs it.
    """
    v = scaled.shape[1]
    n = min(CANDIDATES, v)
    top = jax.lax.top_k(scaled, n)[0]  # [B, n], descending
    k_on = (p.top_k > 0) & (p.top_k < v)
    kth = jnp.take_along_axis(top, jnp.clip(p.top_k - 1, 0, n - 1)[:, None], axis=1)
    k_cut = jnp.where(k_on[:, None], kth, -jnp.inf)
    k_cut = _refine(~k_on | (p.top_k <= n), k_cut, scaled, p.top_k)
    mass = jnp.sum(jnp.where(scaled >= k_cut, jnp.exp(scaled - peak), 0.0), axis=1)  # top-k's
    share = jnp.cumsum(jnp.where(top >= k_cut, jnp.exp(top - peak), 0.0), axis=1) / mass[:, None]
    reached = share >= p.top_p[:, None]
    first = jnp.argmax(reached, axis=1)[:, None]  # first candidate completing mass p
    p_on = p.top_p < 1.0
    p_cut = jnp.where(p_on[:, None], jnp.take_along_axis(top, first, axis=1), -jnp.inf)
    found = ~p_on | jnp.any(reached, axis=1)
    p_cut = _refine(found, p_cut, scaled, p.top_p * mass, lambda: jnp.exp(scaled - peak))
    return jnp.maximum(k_cut, p_cut)


def _refine(found, cut, scaled, need, weights=None) -> jax.Array:
    """`cut` [B, 1] where `found`; elsewhere the exact cut: the largest logit t such that the
    tokens >= t number (or, with `weights`, weigh) at least `need` [B]."""

    def search() -> jax.Array:
        keys, w = _ordered(scaled), None if weights is None else weights()

        def enough(mask: jax.Array) -> jax.Array:
            return jnp.sum(mask if w is None else jnp.where(mask, w, 0.0), axis=1) >= need

        return jnp.where(found[:, None], cut, _unordered(_largest_key(keys, enough)))

    return jax.lax.cond(jnp.all(found), lambda: cut, search)


def _ordered(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like the float32 values `x`."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _unordered(key: jax.Array) -> jax.Array:
    """float32 [B, 1] value of ordered keys [B] (inverse of `_ordered`)."""
    u = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
    return jax.lax.bitcast_convert_type(u, jnp.float32)[:, None]


def _largest_key(keys: jax.Array, enough) -> jax.Array:
    """Per row, the largest key t for which `enough(keys >= t)` holds ([B] uint32), where
    `enough` maps a [B, V] mask to [B] bools and can only turn False as t grows."""

    def halve(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2
        ok = enough(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, hi = jnp.min(keys, axis=1), jnp.max(keys, axis=1)
    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties), int32. XLA:CPU runs `jnp.argmax`'s
    value-and-index reduction several times slower than a max and a min."""
    v = x.shape[-1]
    peak = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == peak, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def gumbel_noise(seed: jax.Array, positions: jax.Array, vocab: int) -> jax.Array:
    """float32 [B, vocab] Gumbel noise, a pure function of (seed, position, token id).

    A counter-based integer hash (two rounds of the `lowbias32` mixer) instead of
    `jax.random`: threefry over the whole vocabulary costs more than the rest of a small
    model's sampling step on CPU, and keying by position keeps draws batch-independent.
    """
    return -jnp.log(-jnp.log(uniform_noise(seed, positions, vocab)))


def uniform_noise(seed: jax.Array, positions: jax.Array, width: int) -> jax.Array:
    """float32 [B, width] uniform draws in (0, 1), a pure function of (seed, position, column):
    the counter-based hash behind `gumbel_noise`, also the speculative acceptance test's."""
    row = _mix(seed.astype(jnp.uint32) ^ _mix(positions.astype(jnp.uint32) + _GOLDEN))
    bits = _mix(_mix(jnp.arange(width, dtype=jnp.uint32)[None, :] * _GOLDEN + row[:, None]))
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) + (0.5 / (1 << 24))


_GOLDEN = np.uint32(0x9E3779B9)


def _mix(x: jax.Array) -> jax.Array:
    x ^= x >> 16
    x *= np.uint32(0x7FEB352D)
    x ^= x >> 15
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def logprob_level(p: SamplingParams) -> int:
    """What a request needs of `sample`'s `n_top`: NO_LOGPROBS, 0 (its tokens' log-probs) or
    MAX_TOP_LOGPROBS (also the most likely alternatives; a request takes its first few)."""
    if p.top_logprobs:
        return MAX_TOP_LOGPROBS
    return 0 if p.logprobs else NO_LOGPROBS


def sample(logits: jax.Array, p: SlotParams, positions: jax.Array, n_top: int | None) -> Sampled:
    """Pick one token per row of float32 `logits` [B, V].

    `positions` [B] is the index the new token will occupy; with the row's seed it keys the
    random draw. Rows with temperature 0 take the argmax; when every row is greedy the filters
    and the draw are skipped entirely. Log-probs cost a pass over the vocabulary, so they are
    computed only when `n_top` is not None (zeros otherwise), with `n_top` alternatives. They
    are log-softmax of the logits given here: after `edit_logits` (penalties and bias) when the
    caller applied it, before temperature and the filters (vLLM's "processed" log-probs).
    """
    b, v = logits.shape
    greedy = first_argmax(logits)

    def draw():
        scaled = _scale(logits, p)
        noisy = scaled + gumbel_noise(p.seed, positions, v)
        filtered = jnp.any(((p.top_k > 0) & (p.top_k < v)) | (p.top_p < 1.0) | (p.min_p > 0))
        noisy = jax.lax.cond(
            filtered, lambda: jnp.where(_keep(scaled, p), noisy, -jnp.inf), lambda: noisy
        )
        return jnp.where(p.temperature > 0, first_argmax(noisy), greedy)

    tokens = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda: greedy)
    top_ids = jnp.zeros((b, n_top or 0), jnp.int32)
    top_logprobs = jnp.zeros((b, n_top or 0), jnp.float32)
    if n_top is None:
        return Sampled(tokens, jnp.zeros((b,), jnp.float32), top_ids, top_logprobs)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1) - lse
    if n_top:
        top_logits, top_ids = jax.lax.top_k(logits, n_top)
        top_logprobs = top_logits - lse
    return Sampled(tokens, chosen[:, 0], top_ids.astype(jnp.int32), top_logprobs)
