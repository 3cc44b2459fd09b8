"""The inference engine: a paged KV pool, chunked prefill and a jitted decode step.

The KV cache is one pool of fixed-size blocks per layer (`PagedKVCache`); a sequence holds a
list of blocks, handed out by `infer.blocks.BlockAllocator`, so memory goes to the tokens
sequences actually have, and sequences that share a prompt prefix share its blocks. The engine
itself is the device half and knows nothing of requests: the scheduler (`infer.batching`) says
which chunks of which sequences to prefill into which blocks, and which slots decode.

A slot is a row of the decode batch: its last token, its length, its sampling settings and
its token history (for penalties) live on the device, so a decode call needs from the host
only the block tables. Prefill writes each chunk straight into the pool through the sequence's
block table; the chunk that ends a prompt also samples the first token and activates the slot.
Decode runs every slot in one call per token (or per `steps_per_call` tokens) with the pool
donated, sampling fused in, and only token ids (plus log-probs) coming back.

Compiled shapes are bucketed (rows, chunk length and block-table width each a power of two)
and recorded in `Engine.compiles` as they appear. Device work is dispatched asynchronously:
methods return device arrays and the caller decides when to read them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infer.grammar import apply_bitmask
from infer.layer_views import unstack_layers
from infer.sampling import (
    NO_LOGPROBS,
    Sampled,
    SamplingParams,
    SlotParams,
    TokenHistory,
    edit_logits,
    logprob_level,
    sample,
)
from infer.speculative import Draft, DraftError, Verified, draft_prefill, speculate
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import CACHE_AXES, PAGED_AXES, QUANTIZED, PagedKVCache, Stored
from llama_jax.model import Params, forward
from sharding.place import stored_shardings
from sharding.rules import logical_to_sharding, split_size, with_rules

log = logging.getLogger("llama_jax.infer")

MIN_PREFILL_LEN = 16
DEFAULT_BLOCK_SIZE = 16


class EngineError(ValueError):
    """A request does not fit the engine (prompt too long, no free slot, ...)."""


class DecodeState(NamedTuple):
    """What the engine's calls carry and donate: the pool and each slot's decode state."""

    k: Stored  # the pool, [layers, kv_heads, blocks, block_size, head_dim] (or int8 + scales)
    v: Stored
    tokens: jax.Array  # int32 [slots]: the last token, the next decode step's input
    lengths: jax.Array  # int32 [slots]: tokens in the cache
    history: TokenHistory  # [slots, vocab]


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to run into the pool in this call.

    `start` tokens of the sequence are already in the pool; `tokens` continue from there, in
    the blocks of `blocks` (which cover `start + len(tokens)`). Tokens at indices below
    `generated_from` count as prompt for the penalties, later ones as generated (a sequence
    recomputed after preemption). `last` chunks end the prompt: they sample the first token
    with `settings` (params, seed) and make `slot` decode.
    """

    slot: int
    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
    generated_from: int
    last: bool
    settings: tuple[SamplingParams, int]


def _record(history: TokenHistory, slots, tokens, positions, real, generated_from):
    """The history rows of a prefill batch after its chunks: each row's slot's history (afresh
    for a chunk at position 0) with the chunk recorded (`TokenHistory.record`). Padding rows
    read a clipped slot and are never written back."""
    at = jnp.minimum(slots, history.counts.shape[0] - 1)
    fresh = positions[:, :1] == 0
    rows = TokenHistory(
        jnp.where(fresh, 0, history.counts[at]), jnp.where(fresh, False, history.prompt[at])
    )
    return rows.record(tokens, real, positions >= generated_from[:, None])


def _prefill(params, state, tokens, tables, starts, lengths, slots, generated_from, last,
             row_params, bitmask, *, config, n_top):  # fmt: skip
    """Run one chunk per row into the pool. Rows with `last` sample their first token and set
    their slot's decode state; padding rows have slot == number of slots (scatters drop)."""
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    real = positions < (starts + lengths)[:, None]
    cache = PagedKVCache(state.k, state.v, tables, starts)
    logits, cache = forward(
        params, tokens, segment_ids=real.astype(jnp.int32), cache=cache, config=config,
        last_only=True,
    )  # fmt: skip
    n_slots = state.tokens.shape[0]
    rows = _record(state.history, slots, tokens, positions, real, generated_from)
    logits = edit_logits(logits[:, 0], row_params, rows)
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    first = sample(logits, row_params, cache.lengths, n_top)
    rows = rows.add(first.tokens, last)
    target = jnp.where(last, slots, n_slots)  # only finished prompts take over their slot
    history = TokenHistory(
        state.history.counts.at[slots].set(rows.counts, mode="drop"),
        state.history.prompt.at[slots].set(rows.prompt, mode="drop"),
    )
    state = DecodeState(
        cache.k,
        cache.v,
        state.tokens.at[target].set(first.tokens, mode="drop"),
        state.lengths.at[target].set(cache.lengths, mode="drop"),
        history,
    )
    return state, first


def _decode(params, state, tables, slot_params, active, bitmask, *, config, n_steps, n_top):
    """`n_steps` decode steps for every slot; inactive slots do not advance (their tables hold
    no blocks, so their writes are dropped)."""
    segment_ids = active.astype(jnp.int32)[:, None]

    def step(state: DecodeState, _):
        cache = PagedKVCache(state.k, state.v, tables, state.lengths)
        logits, cache = forward(
            params, state.tokens[:, None], segment_ids=segment_ids, cache=cache, config=config
        )
        logits = edit_logits(logits[:, 0], slot_params, state.history)
        if bitmask is not None:
            logits = apply_bitmask(logits, bitmask)
        out = sample(logits, slot_params, cache.lengths, n_top)
        history = state.history.add(out.tokens, active)
        return DecodeState(cache.k, cache.v, out.tokens, cache.lengths, history), out

    return jax.lax.scan(step, state, None, length=n_steps)


def _jit_all(wrap=lambda f: f):
    return {
        "prefill": jax.jit(
            wrap(_prefill), static_argnames=("config", "n_top"), donate_argnums=(1,)
        ),
        "decode": jax.jit(
            wrap(_decode), static_argnames=("config", "n_steps", "n_top"), donate_argnums=(1,)
        ),
        "draft_prefill": jax.jit(
            wrap(draft_prefill), static_argnames=("config",), donate_argnums=(1,)
        ),
        "speculate": jax.jit(
            wrap(speculate),
            static_argnames=("config", "draft_config", "k", "n_top"),
            donate_argnums=(1, 3),
        ),
    }


@functools.cache
def _jitted(mesh: jax.sharding.Mesh | None, rules: str) -> dict:
    """The jitted functions for a mesh (activation constraints by `rules`), or unsharded.
    Cached, so compiled code outlives an engine (each `model.generate` call builds one)."""
    if mesh is None:
        return _jit_all()
    return _jit_all(lambda f: with_rules(f, mesh, rules))


def bucket(n: int, lo: int, hi: int) -> int:
    """The power of two >= max(n, lo), capped at hi."""
    return min(max(lo, 1 << max(n - 1, 0).bit_length()), hi)


class Engine:
    """Paged prefill + decode for one model over `slots` decode rows.

    The pool has `num_blocks` blocks of `block_size` tokens (default: enough for every slot to
    hold `max_len` tokens). `block_size=max_len` with `num_blocks=slots` is the contiguous
    layout: one whole-context row per sequence. With a `mesh`, the pool is placed by
    `sharding` rules (`rules`, default "infer_tp": KV heads over `tensor`, blocks whole) and
    activations are constrained by the same table; `params` must already be on that mesh.
    A `draft` makes decode calls speculative (`decode_speculative`, `infer.speculative`): it
    keeps a pool of its own beside the target's, written through the same block tables.
    `kv_cache_dtype` is the pool's: None for the compute dtype, or "int8" (`QuantizedKV`: int8
    values with per token, per KV head scales, about half a bfloat16 pool's bytes).
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: Params,
        *,
        slots: int = 8,
        max_len: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int | None = None,
        prefill_chunk: int = 512,
        steps_per_call: int = 1,
        mesh: jax.sharding.Mesh | None = None,
        rules: str = "infer_tp",
        kv_cache_dtype: str | None = None,
        draft: Draft | None = None,
    ) -> None:
        if kv_cache_dtype not in (None, QUANTIZED):
            raise EngineError(
                f"kv_cache_dtype must be None or {QUANTIZED!r}, got {kv_cache_dtype!r}"
            )
        self.kv_cache_dtype = kv_cache_dtype
        self.config = config
        self.params = engine_params(params, mesh)
        # The slots fill the decode batch, which must divide over the mesh axes the rules split
        # it over.
        split = 1 if mesh is None else split_size(CACHE_AXES[1], mesh, rules)
        self.slots = -(-slots // split) * split
        self.max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        if self.max_len < 2:
            raise EngineError(f"max_len must be >= 2, got {self.max_len}")
        if block_size < 1:
            raise EngineError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.blocks_per_seq = -(-self.max_len // block_size)
        self.num_blocks = num_blocks or self.slots * self.blocks_per_seq
        self.prefill_chunk = bucket(prefill_chunk, MIN_PREFILL_LEN, 1 << 30)
        self.steps_per_call = steps_per_call
        if draft is not None:
            try:
                draft.check(config)
            except DraftError as e:
                raise EngineError(str(e)) from None
            if steps_per_call != 1:
                raise EngineError("--steps-per-call must be 1 with --draft (a call already "
                                  "yields up to --draft-tokens + 1 tokens)")  # fmt: skip
            draft = Draft(draft.config, engine_params(draft.params, mesh), draft.tokens)
        self.draft = draft
        self.compiles: list[str] = []
        self.mesh, self.rules = mesh, rules
        self.reset()

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of k and v (values and any scales) one block holds, over all layers."""
        pool = jax.eval_shape(
            lambda: PagedKVCache.pool_zeros(self.config, 1, self.block_size, self.kv_cache_dtype)
        )
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pool))

    def reset(self) -> None:
        """An empty pool with every slot free (also the way back from a failed call, whose
        donated buffers may be gone)."""
        self._fns = _jitted(self.mesh, self.rules)
        self.state = self._zeros()
        self.draft_pool = None if self.draft is None else self._draft_zeros()
        self._host = SlotParams.host([(SamplingParams(), 0)] * self.slots)
        self._active = np.zeros(self.slots, np.bool_)
        self._want = np.full(self.slots, NO_LOGPROBS)
        self._device_slots: tuple[SlotParams, jax.Array] | None = None

    def _zeros(self) -> DecodeState:
        c, s = self.config, self.slots

        def zeros() -> DecodeState:
            k, v = PagedKVCache.pool_zeros(c, self.num_blocks, self.block_size, self.kv_cache_dtype)
            ids = functools.partial(jnp.zeros, (s,), jnp.int32)  # two buffers: both are donated
            return DecodeState(k, v, ids(), ids(), TokenHistory.zeros(s, c.vocab_size))

        if self.mesh is None:  # eager zeros: a jit of this fresh closure would compile each time
            return zeros()
        shape = jax.eval_shape(zeros)
        pool = stored_shardings(shape.k, PAGED_AXES, self.mesh, self.rules, "KV pool")
        rows = CACHE_AXES[1:2]
        row = logical_to_sharding(rows, self.mesh, self.rules, shape.tokens.shape, "slots")
        hist = logical_to_sharding(
            (*rows, None), self.mesh, self.rules, shape.history.counts.shape, "token history"
        )
        shardings = DecodeState(pool, pool, row, row, TokenHistory(hist, hist))
        return jax.jit(zeros, out_shardings=shardings)()

    def _draft_zeros(self) -> tuple[jax.Array, jax.Array]:
        """The draft's empty pool: the target's blocks, in the draft's shapes."""
        pool = PagedKVCache.pool_zeros(self.draft.config, self.num_blocks, self.block_size)
        if self.mesh is None:
            return pool
        where = stored_shardings(pool[0], PAGED_AXES, self.mesh, self.rules, "draft pool")
        return jax.device_put(pool, where)

    @property
    def tokens_per_call(self) -> int:
        """The most tokens one decode call adds to a slot (the blocks it may write)."""
        return self.steps_per_call if self.draft is None else self.draft.tokens + 1

    # --- bookkeeping -----------------------------------------------------------------------

    def _compiled(self, key: str) -> None:
        if key not in self.compiles:
            self.compiles.append(key)
            log.info("compiling %s", key)

    @property
    def active_slots(self) -> list[int]:
        return np.flatnonzero(self._active).tolist()

    def release(self, slot: int) -> None:
        """Stop decoding `slot`."""
        self._active[slot] = False
        self._want[slot] = NO_LOGPROBS
        self._device_slots = None

    def max_prompt_len(self) -> int:
        """Longest prompt that still leaves room for one generated token."""
        return min(self.max_len, self.num_blocks * self.block_size) - 1

    def table(self, rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
        """Block tables [rows, width], padded with the out-of-pool block (writes dropped)."""
        out = np.full((len(rows), width), self.num_blocks, np.int32)
        for i, blocks in enumerate(rows):
            out[i, : len(blocks)] = blocks
        return out

    # --- prefill ---------------------------------------------------------------------------

    def prefill(self, chunks: Sequence[Chunk], bitmask: np.ndarray | None = None) -> Sampled:
        """Run `chunks` (at most `prefill_chunk` tokens each) in one call. Returns each row's
        first token as device arrays (meaningful for `last` chunks, whose slots now decode).
        `bitmask` [len(chunks), words] constrains those first tokens (see `infer.grammar`)."""
        rows = bucket(len(chunks), 1, 1 << 30)
        length = bucket(max(len(c.tokens) for c in chunks), MIN_PREFILL_LEN, self.prefill_chunk)
        width = bucket(max(len(c.blocks) for c in chunks), 1, self.blocks_per_seq)
        tokens = np.zeros((rows, length), np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : len(c.tokens)] = c.tokens
        pad = rows - len(chunks)

        def column(values, fill, dtype=np.int32):
            return np.asarray([*values, *[fill] * pad], dtype)

        settings = [c.settings for c in chunks] + [(SamplingParams(), 0)] * pad
        want = [logprob_level(c.settings[0]) if c.last else NO_LOGPROBS for c in chunks]
        n_top = _n_top(want)
        if bitmask is not None:
            bitmask = np.concatenate([bitmask, np.full((pad, bitmask.shape[1]), -1, np.int32)])
        self._compiled(
            f"prefill rows={rows} chunk={length} blocks={width} logprobs={n_top} "
            f"masked={bitmask is not None}"
        )
        tables = self.table([c.blocks for c in chunks] + [[]] * pad, width)
        starts = column((c.start for c in chunks), 0)
        lengths = column((len(c.tokens) for c in chunks), 0)
        if self.draft is not None:
            self.draft_pool = self._fns["draft_prefill"](
                self.draft.params, self.draft_pool, tokens, tables, starts, lengths,
                config=self.draft.config,
            )  # fmt: skip
        self.state, first = self._fns["prefill"](
            self.params, self.state, tokens, tables, starts, lengths,
            column((c.slot for c in chunks), self.slots),
            column((c.generated_from for c in chunks), 0),
            column((c.last for c in chunks), False, np.bool_),
            SlotParams.host(settings), bitmask,
            config=self.config, n_top=n_top,
        )  # fmt: skip
        for c in chunks:
            if c.last:
                self._activate(c.slot, c.settings)
        return first

    def _activate(self, slot: int, settings: tuple[SamplingParams, int]) -> None:
        row = SlotParams.host([settings])
        for name, values in zip(SlotParams._fields, row, strict=True):
            getattr(self._host, name)[slot] = values[0]
        self._active[slot] = True
        self._want[slot] = logprob_level(settings[0])
        self._device_slots = None

    # --- decode ----------------------------------------------------------------------------

    def _slots_on_device(self) -> tuple[SlotParams, jax.Array, int | None]:
        """The slots' settings and activity on the device (sent once per change) and the
        log-prob setting the active slots need."""
        if self._device_slots is None:
            self._device_slots = jax.device_put((self._host, self._active.copy()))
        return (*self._device_slots, _n_top(self._want[self._active]))

    def decode(self, tables: np.ndarray, bitmask: np.ndarray | None = None) -> Sampled:
        """One decode call for all slots: `steps_per_call` tokens each (1 with a `bitmask`
        [slots, words]), arrays [steps, slots] still on device. `tables` [slots, width] are the
        slots' blocks, covering their lengths plus the steps (see `table`). Inactive slots
        produce tokens that mean nothing."""
        slot_params, active, n_top = self._slots_on_device()
        steps = 1 if bitmask is not None else self.steps_per_call
        self._compiled(
            f"decode slots={self.slots} blocks={tables.shape[1]} steps={steps} "
            f"logprobs={n_top} masked={bitmask is not None}"
        )
        self.state, out = self._fns["decode"](
            self.params, self.state, tables, slot_params, active, bitmask,
            config=self.config, n_steps=steps, n_top=n_top,
        )  # fmt: skip
        return out

    def decode_speculative(self, tables: np.ndarray) -> Verified:
        """One speculative call for all slots (an engine with a `draft`): up to
        `tokens_per_call` tokens each, arrays [tokens_per_call, slots] of which each slot's
        first `counts` are real. `tables` cover the slots' lengths plus `tokens_per_call`."""
        slot_params, active, n_top = self._slots_on_device()
        k = self.draft.tokens
        self._compiled(f"speculate slots={self.slots} blocks={tables.shape[1]} k={k} "
                       f"logprobs={n_top}")  # fmt: skip
        self.state, self.draft_pool, out = self._fns["speculate"](
            self.params, self.state, self.draft.params, self.draft_pool, tables, slot_params,
            active, config=self.config, draft_config=self.draft.config, k=k, n_top=n_top,
        )  # fmt: skip
        return out


def engine_params(params: Params, mesh: jax.sharding.Mesh | None) -> Params:
    """The weights as the engine reads them: per-layer arrays on CPU (see `infer.layer_views`
    for why). The per-layer arrays are views of the stacked ones, so this costs neither memory
    nor time per engine."""
    if mesh is None and jax.default_backend() == "cpu":
        return unstack_layers(params)
    return params


def _n_top(wants) -> int | None:
    """The static log-prob setting a call needs to serve every row's `logprob_level`."""
    level = max(wants, default=NO_LOGPROBS)
    return None if level == NO_LOGPROBS else level
