"""The inference engine: bucketed, chunked prefill and a jitted decode step over a fixed cache.

The engine owns one preallocated `KVCache` with a row per decode slot. A request is prefilled
into a small cache of its own (prompts of one batch padded to a shared power-of-two length,
processed in chunks so attention memory stays bounded), its first token is sampled, and the
small cache is copied into the slot's row of the big one. Decoding then runs every slot in one
jitted call per token (or per `steps_per_call` tokens) with the big cache donated, sampling
fused in, and only token ids (plus log-probs) coming back. Compiled shapes are few and are
recorded in `Engine.compiles` as they appear.

Device work is dispatched asynchronously: methods return device arrays and the caller decides
when to read them (see `batching.Scheduler`, which overlaps reading step t with running t+1).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infer.layer_views import unstack_layers
from infer.sampling import (
    NO_LOGPROBS,
    Sampled,
    SamplingParams,
    SlotParams,
    logprob_level,
    sample,
)
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.model import Params, forward
from sharding.place import cache_shardings
from sharding.rules import logical_to_spec, split_size, with_rules

log = logging.getLogger("llama_jax.infer")

MIN_PREFILL_LEN = 16


class EngineError(ValueError):
    """A request does not fit the engine (prompt too long, no free slot, ...)."""


class DecodeState(NamedTuple):
    """What the decode step carries and donates: the cache and each slot's last token."""

    cache: KVCache
    tokens: jax.Array  # int32 [slots]


def _prefill_chunk(params, cache, last, tokens, segment_ids, *, config):
    """Run one chunk of prompt tokens into the prefill cache; keep, per row, the logits of the
    chunk that holds its last prompt token (rows of a ragged batch end in different chunks)."""
    logits, cache = forward(
        params, tokens, segment_ids=segment_ids, cache=cache, config=config, last_only=True
    )
    has_tokens = jnp.any(segment_ids != 0, axis=1)[:, None]
    return cache, jnp.where(has_tokens, logits[:, 0], last)


def _commit(state, prefill, last, slots, params, *, n_top):
    """Sample each row's first token and copy its prefill cache into decode slot `slots[i]`.
    Padding rows carry slot index == number of slots, which the scatters drop."""
    cache, n = state.cache, prefill.max_len
    first = sample(last, params, prefill.lengths, n_top)
    cache = KVCache(
        cache.k.at[:, slots, :n].set(prefill.k.astype(cache.k.dtype), mode="drop"),
        cache.v.at[:, slots, :n].set(prefill.v.astype(cache.v.dtype), mode="drop"),
        cache.lengths.at[slots].set(prefill.lengths, mode="drop"),
    )
    return DecodeState(cache, state.tokens.at[slots].set(first.tokens, mode="drop")), first


def _decode(params, state, slot_params, active, *, config, n_steps, n_top):
    """`n_steps` decode steps for every slot; inactive slots do not advance their cache."""
    segment_ids = active.astype(jnp.int32)[:, None]

    def step(state: DecodeState, _):
        logits, cache = forward(
            params, state.tokens[:, None], segment_ids=segment_ids, cache=state.cache,
            config=config,
        )  # fmt: skip
        out = sample(logits[:, 0], slot_params, cache.lengths, n_top)
        return DecodeState(cache, out.tokens), out

    return jax.lax.scan(step, state, None, length=n_steps)


def _jit_all(wrap=lambda f: f):
    return {
        "prefill": jax.jit(
            wrap(_prefill_chunk), static_argnames=("config",), donate_argnums=(1, 2)
        ),
        "commit": jax.jit(wrap(_commit), static_argnames=("n_top",), donate_argnums=(0,)),
        "decode": jax.jit(
            wrap(_decode), static_argnames=("config", "n_steps", "n_top"), donate_argnums=(1,)
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


@dataclass
class Prefill:
    """A batch of prompts being prefilled, one chunk per `Engine.advance` call."""

    slots: list[int]
    prompt_lens: list[int]
    tokens: np.ndarray  # int32 [rows, chunks * chunk]
    chunk: int
    cache: KVCache
    last: jax.Array
    params: SlotParams
    want: list[int]  # per row: log-probs asked for (see `logprob_level`)
    next_chunk: int = 0
    first: Sampled | None = field(default=None, repr=False)  # set when done (device arrays)


class Engine:
    """Prefill + decode over `slots` cache rows of `max_len` tokens for one model.

    With a `mesh`, the cache is placed by `sharding` rules (`rules`, default "infer_tp": slots
    over the data axes, KV heads over `tensor`) and activations are constrained by the same
    table; `params` must already be placed on that mesh.
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: Params,
        *,
        slots: int = 8,
        max_len: int | None = None,
        prefill_chunk: int = 512,
        steps_per_call: int = 1,
        mesh: jax.sharding.Mesh | None = None,
        rules: str = "infer_tp",
    ) -> None:
        self.config = config
        self.params = engine_params(params, mesh)
        # The slots fill the cache's batch dimension, which must divide over the mesh axes the
        # rules split it over.
        split = 1 if mesh is None else split_size(CACHE_AXES[1], mesh, rules)
        self.slots = -(-slots // split) * split
        self.max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        if self.max_len < 2:
            raise EngineError(f"max_len must be >= 2, got {self.max_len}")
        self.prefill_chunk = bucket(prefill_chunk, MIN_PREFILL_LEN, 1 << 30)
        self.steps_per_call = steps_per_call
        self.compiles: list[str] = []
        self.mesh, self.rules = mesh, rules
        self.reset()

    def reset(self) -> None:
        """A fresh cache with every slot free (also the way back from a failed call, whose
        donated buffers may be gone)."""
        self._fns, self.state = self._setup(self.mesh, self.rules)
        self._host = SlotParams.host([(SamplingParams(), 0)] * self.slots)
        self._active = np.zeros(self.slots, np.bool_)
        self._want = np.full(self.slots, NO_LOGPROBS)
        self._device_slots: tuple[SlotParams, jax.Array] | None = None

    def _setup(self, mesh, rules) -> tuple[dict, DecodeState]:
        zeros = functools.partial(KVCache.zeros, self.config, self.slots, self.max_len)
        if mesh is None:  # eager zeros: a jit of this fresh partial would compile every time
            return _jitted(None, ""), DecodeState(zeros(), jnp.zeros((self.slots,), jnp.int32))
        shardings = cache_shardings(
            KVCache.abstract(self.config, self.slots, self.max_len), mesh, rules
        )
        cache = jax.jit(zeros, out_shardings=shardings)()
        tokens = jax.device_put(jnp.zeros((self.slots,), jnp.int32), shardings.lengths)
        self._prefill_sharding = jax.sharding.NamedSharding(mesh, _prefill_cache_spec(mesh, rules))
        return _jitted(mesh, rules), DecodeState(cache, tokens)

    # --- bookkeeping -----------------------------------------------------------------------

    def _compiled(self, key: str) -> None:
        if key not in self.compiles:
            self.compiles.append(key)
            log.info("compiling %s", key)

    @property
    def active_slots(self) -> list[int]:
        return np.flatnonzero(self._active).tolist()

    def release(self, slot: int) -> None:
        """Stop decoding `slot`; its cache row is overwritten by the next prefill into it."""
        self._active[slot] = False
        self._want[slot] = NO_LOGPROBS
        self._device_slots = None

    def max_prompt_len(self) -> int:
        """Longest prompt that still leaves room for one generated token."""
        return self.max_len - 1

    # --- prefill ---------------------------------------------------------------------------

    def start_prefill(
        self, slots: list[int], prompts: list[list[int]], settings: list[tuple[SamplingParams, int]]
    ) -> Prefill:
        """Set up prefill of `prompts` into free `slots`; settings are (params, seed) per row."""
        for prompt in prompts:
            if not 1 <= len(prompt) <= self.max_prompt_len():
                raise EngineError(
                    f"prompt has {len(prompt)} tokens; it must have 1..{self.max_prompt_len()} "
                    f"(the context is {self.max_len} tokens, and one is needed to generate)"
                )
        busy = [s for s in slots if self._active[s]]
        if busy:
            raise EngineError(f"slots {busy} are busy")
        rows = bucket(len(prompts), 1, 1 << 30)
        length = bucket(max(map(len, prompts)), MIN_PREFILL_LEN, self.max_len)
        chunk = min(length, self.prefill_chunk)
        padded = -(-length // chunk) * chunk
        tokens = np.zeros((rows, padded), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
        pad = [(SamplingParams(), 0)] * (rows - len(prompts))
        cache = KVCache.zeros(self.config, rows, length)
        if self.mesh is not None:
            cache = jax.device_put(
                cache, KVCache(self._prefill_sharding, self._prefill_sharding, None)
            )
        last = jnp.zeros((rows, self.config.vocab_size), jnp.float32)
        return Prefill(
            slots=list(slots) + [self.slots] * (rows - len(prompts)),
            prompt_lens=[len(p) for p in prompts] + [0] * (rows - len(prompts)),
            tokens=tokens,
            chunk=chunk,
            cache=cache,
            last=last,
            params=SlotParams.host(list(settings) + pad),
            want=[logprob_level(p) for p, _ in settings] + [NO_LOGPROBS] * len(pad),
        )

    def advance(self, job: Prefill) -> bool:
        """Run the next chunk of `job`; after the last one, sample first tokens and move the
        rows into their decode slots (which become active). Returns whether `job` is done."""
        c, i = job.chunk, job.next_chunk
        lens = np.asarray(job.prompt_lens)[:, None]
        positions = np.arange(i * c, (i + 1) * c)[None, :]
        segment_ids = (positions < lens).astype(np.int32)
        rows, length = job.tokens.shape[0], job.cache.max_len
        self._compiled(f"prefill rows={rows} chunk={c} len={length}")
        job.cache, job.last = self._fns["prefill"](
            self.params, job.cache, job.last, job.tokens[:, i * c : (i + 1) * c], segment_ids,
            config=self.config,
        )  # fmt: skip
        job.next_chunk += 1
        if job.next_chunk * c < job.tokens.shape[1]:
            return False
        n_top = _n_top(job.want)
        self._compiled(f"commit rows={rows} len={length} logprobs={n_top}")
        self.state, job.first = self._fns["commit"](
            self.state, job.cache, job.last, np.asarray(job.slots, np.int32), job.params,
            n_top=n_top,
        )  # fmt: skip
        job.cache = job.last = None
        self._activate(job)
        return True

    def _activate(self, job: Prefill) -> None:
        for row, slot in enumerate(job.slots):
            if slot < self.slots:
                for name, values in zip(SlotParams._fields, job.params, strict=True):
                    getattr(self._host, name)[slot] = values[row]
                self._active[slot] = True
                self._want[slot] = job.want[row]
        self._device_slots = None

    # --- decode ----------------------------------------------------------------------------

    def decode(self) -> Sampled:
        """One decode call for all slots: `steps_per_call` tokens each, arrays [steps, slots]
        still on device. Inactive slots produce tokens that mean nothing."""
        if self._device_slots is None:
            self._device_slots = jax.device_put((self._host, self._active.copy()))
        slot_params, active = self._device_slots
        n_top = _n_top(self._want[self._active])
        self._compiled(
            f"decode slots={self.slots} len={self.max_len} steps={self.steps_per_call} "
            f"logprobs={n_top}"
        )
        self.state, out = self._fns["decode"](
            self.params, self.state, slot_params, active,
            config=self.config, n_steps=self.steps_per_call, n_top=n_top,
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


def _prefill_cache_spec(mesh, rules) -> jax.sharding.PartitionSpec:
    """The prefill cache is sharded like the decode cache except over rows (a prefill batch is
    small and need not divide the data axes)."""
    names = (CACHE_AXES[0], None, *CACHE_AXES[2:])
    return logical_to_spec(names, dict(mesh.shape), rules)
