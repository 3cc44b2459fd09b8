"""Speculative decoding: a draft model proposes k tokens, the target checks them in one forward.

A decode call of a speculating engine runs, for every slot, k single-token steps of the draft
(proposals d1..dk, each drawn from the draft's distribution q after the slot's temperature,
top-k, top-p and min-p), then one target forward over [last, d1..dk] into the paged pool, like
a prefill chunk. The acceptance rule of Leviathan et al. and Chen et al. (2023) then keeps d_i
with probability min(1, p(d_i) / q(d_i)); at the first rejection it draws from
norm(max(0, p - q)), and when every proposal is kept it draws a bonus token from the target's
last distribution. So each call yields 1..k+1 tokens per slot, distributed exactly as the
target alone would sample them. Greedy rows (temperature 0) keep proposals while they equal the
target's argmax: the output is the target's own greedy output.

The draft keeps its own pool of the same blocks, indexed by the same block tables, so the
scheduler's allocator, prefix cache and preemption serve both models: every prefill chunk runs
through both, and when some slot kept all k proposals the draft runs a (k+1)-th step (hidden
states only) so its cache holds every token the target accepted. Entries past a slot's new
length are overwritten later.

Exactness rules out what edits the distribution per token from the generated history or
constrains it token by token: repetition, frequency and presence penalties and
`response_format` are refused for a speculating engine (`refusal`), as is `steps_per_call` > 1.
`logit_bias` does not depend on the history and applies to both models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infer.sampling import (
    Sampled,
    SamplingParams,
    SlotParams,
    edit_logits,
    filter_logits,
    first_argmax,
    gumbel_noise,
    sample,
    uniform_noise,
)
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import PagedKVCache
from llama_jax.model import Params, forward
from llama_jax.quantize import quantization_of, quantize_params

SELF_INT8 = "self-int8"
DEFAULT_DRAFT_TOKENS = 4
# Seed salts: the draft's draws, the acceptance tests and the corrections use independent noise.
_DRAFT_SALT = np.uint32(0x5BD1E995)
_ACCEPT_SALT = np.uint32(0x27D4EB2F)
_RESIDUAL_SALT = np.uint32(0x165667B1)


class DraftError(ValueError):
    """A draft model that cannot speculate for the target (vocabulary, settings)."""


@dataclass(frozen=True, eq=False)
class Draft:
    """The model that proposes `tokens` tokens per call: any model with the target's
    vocabulary (a smaller one of the same tokenizer, or the target quantized)."""

    config: LlamaConfig
    params: Params
    tokens: int = DEFAULT_DRAFT_TOKENS

    def check(self, target: LlamaConfig) -> None:
        """Raise DraftError unless this draft can propose tokens for `target`."""
        if self.config.vocab_size != target.vocab_size:
            raise DraftError(
                f"--draft: the draft's vocab_size is {self.config.vocab_size}, the target's "
                f"{target.vocab_size}; a draft must share the target's tokenizer"
            )
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise DraftError(f"--draft-tokens must be an integer >= 1, got {self.tokens!r}")


def self_int8_draft(config: LlamaConfig, params: Params, tokens: int) -> Draft:
    """The target's own weights quantized to int8 as its draft (no second checkpoint): about a
    quarter of a float32 target's bytes to read per token, which is what decoding waits on."""
    if quantization_of(params) is not None:
        raise DraftError(f"{SELF_INT8} drafts a float model; this one is already quantized")
    return Draft(config, quantize_params(params, config, "int8"), tokens)


def resolve_draft(draft: Any, config: LlamaConfig, params: Params, tokens: int) -> Draft | None:
    """`draft` as a `Draft`: None, SELF_INT8, a `Draft`, or a loaded model (config, params)."""
    if draft is None or isinstance(draft, Draft):
        return draft
    if draft == SELF_INT8:
        return self_int8_draft(config, params, tokens)
    if isinstance(draft, str):
        raise DraftError(f"--draft: expected a checkpoint or {SELF_INT8!r}, got {draft!r}")
    return Draft(draft.config, draft.params, tokens)


def refusal(params: SamplingParams) -> str | None:
    """Why a speculating engine cannot serve `params` exactly (the setting named), or None."""
    if params.repetition_penalty != 1.0:
        return "repetition_penalty"
    if params.frequency_penalty or params.presence_penalty:
        return "frequency_penalty" if params.frequency_penalty else "presence_penalty"
    if params.response_format is not None:
        return "response_format"
    return None


class Verified(NamedTuple):
    """A speculative call's result: `out` arrays [k+1, slots] (the target's log-probs), of which
    each slot's first `counts` [slots] tokens are real."""

    out: Sampled
    counts: jax.Array


def probabilities(logits: jax.Array, p: SlotParams) -> jax.Array:
    """float32 [B, V]: the distribution `sample` draws from (one-hot argmax for greedy rows)."""
    soft = jax.nn.softmax(filter_logits(logits, p), axis=-1)
    hard = jax.nn.one_hot(first_argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where((p.temperature > 0)[:, None], soft, hard)


def _leading(kept: jax.Array) -> jax.Array:
    """int32 [B]: how many leading entries of `kept` [B, k] are True."""
    return jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)


def accept(target: jax.Array, draft: jax.Array, drafts: jax.Array, p: SlotParams,
           positions: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """The acceptance rule over edited logits: `target` [B, k+1, V] (after [last, d1..dk]),
    `draft` [B, k, V] (the logits d1..dk were drawn from), proposals `drafts` [B, k] whose first
    occupies index `positions` [B]. Returns tokens [B, k+1] and counts [B] in 1..k+1: each
    row's first counts tokens are its new ones. Randomness is keyed by (seed, position)."""
    b, k = drafts.shape

    def greedy() -> tuple[jax.Array, jax.Array]:
        best = first_argmax(target)  # accepted proposals equal it, so it is the output
        return best, _leading(drafts == best[:, :k]) + 1

    def general() -> tuple[jax.Array, jax.Array]:
        per_position = jax.vmap(probabilities, in_axes=(1, None), out_axes=1)
        pt, qd = per_position(target, p), per_position(draft, p)
        at = drafts[..., None]
        p_d = jnp.take_along_axis(pt[:, :k], at, axis=-1)[..., 0]
        q_d = jnp.take_along_axis(qd, at, axis=-1)[..., 0]
        u = uniform_noise(p.seed ^ _ACCEPT_SALT, positions, k)
        n = _leading(u * q_d < p_d)  # u < p/q; q_d > 0 where d was drawn
        rows = jnp.arange(b)
        q_next = jnp.where((n < k)[:, None], qd[rows, jnp.minimum(n, k - 1)], 0.0)
        residual = jnp.maximum(pt[rows, n] - q_next, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, pt[rows, n])
        noise = gumbel_noise(p.seed ^ _RESIDUAL_SALT, positions + n, residual.shape[-1])
        fix = first_argmax(jnp.log(residual) + noise)
        column = jnp.arange(k + 1)[None, :]
        padded = jnp.concatenate([drafts, fix[:, None]], axis=1)
        return jnp.where(column < n[:, None], padded, fix[:, None]), n + 1

    return jax.lax.cond(jnp.any(p.temperature > 0), general, greedy)


def _target_logprobs(logits: jax.Array, tokens: jax.Array, n_top: int | None) -> Sampled:
    """`Sampled` [k+1, B] for `tokens` [B, k+1] under the target's edited `logits` [B, k+1, V]
    (as `sample` reports them: before temperature and filters)."""
    b, t = tokens.shape
    top_ids = jnp.zeros((t, b, n_top or 0), jnp.int32)
    top_logprobs = jnp.zeros((t, b, n_top or 0), jnp.float32)
    if n_top is None:
        return Sampled(tokens.T, jnp.zeros((t, b), jnp.float32), top_ids, top_logprobs)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    if n_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, n_top)
        top_logprobs, top_ids = top_logprobs.swapaxes(0, 1), top_ids.swapaxes(0, 1)
    return Sampled(tokens.T, chosen.T, top_ids.astype(jnp.int32), top_logprobs)


def draft_prefill(params, pool, tokens, tables, starts, lengths, *, config):
    """Run a prefill batch's chunks into the draft's pool (its logits are not needed)."""
    real = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    cache = PagedKVCache(*pool, tables, starts)
    _, cache = forward(params, tokens, segment_ids=real, cache=cache, config=config,
                       last_only=True, hidden_only=True)  # fmt: skip
    return cache.k, cache.v


def speculate(params, state, draft_params, pool, tables, slot_params, active, *, config,
              draft_config, k, n_top):  # fmt: skip
    """One speculative call for every slot (see the module docstring). `state` is the engine's
    `DecodeState`, `pool` the draft's (k, v); both come back advanced by each active slot's
    count. The token history is left as it is: the penalties that read it are refused."""
    segment_ids = active.astype(jnp.int32)[:, None]
    start = state.lengths

    def propose(carry, i):
        dk, dv, token = carry
        cache = PagedKVCache(dk, dv, tables, start + i)
        logits, cache = forward(draft_params, token[:, None], segment_ids=segment_ids,
                                cache=cache, config=draft_config)  # fmt: skip
        logits = edit_logits(logits[:, 0], slot_params, state.history)
        salted = slot_params._replace(seed=slot_params.seed ^ _DRAFT_SALT)
        drawn = sample(logits, salted, start + i + 1, None).tokens
        return (cache.k, cache.v, drawn), (drawn, logits)

    (dk, dv, last), (drafts, draft_logits) = jax.lax.scan(
        propose, (*pool, state.tokens), jnp.arange(k, dtype=jnp.int32)
    )
    drafts, draft_logits = drafts.T, draft_logits.swapaxes(0, 1)  # [B, k], [B, k, V]
    chunk = jnp.concatenate([state.tokens[:, None], drafts], axis=1)
    logits, target = forward(
        params, chunk, segment_ids=jnp.broadcast_to(segment_ids, chunk.shape),
        cache=PagedKVCache(state.k, state.v, tables, start), config=config,
    )  # fmt: skip
    edit = jax.vmap(edit_logits, in_axes=(1, None, None), out_axes=1)
    logits = edit(logits, slot_params, state.history)
    tokens, counts = accept(logits, draft_logits, drafts, slot_params, start + 1)
    counts = jnp.where(active, counts, 0)

    def catch_up(pool):
        """The last proposal into the draft's cache, for rows that kept all k (hidden only)."""
        cache = PagedKVCache(*pool, tables, start + k)
        _, cache = forward(draft_params, last[:, None], segment_ids=segment_ids, cache=cache,
                           config=draft_config, hidden_only=True)  # fmt: skip
        return cache.k, cache.v

    pool = jax.lax.cond(jnp.any(counts == k + 1), catch_up, lambda pool: pool, (dk, dv))
    rows = jnp.arange(tokens.shape[0])
    state = state._replace(
        k=target.k,
        v=target.v,
        tokens=jnp.where(active, tokens[rows, jnp.maximum(counts - 1, 0)], state.tokens),
        lengths=start + counts,
    )
    return state, pool, Verified(_target_logprobs(logits, tokens, n_top), counts)
