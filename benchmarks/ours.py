"""Our side of each row, through the code paths users run.

decode  -> `infer.generate.generate` (the engine and scheduler behind `Model.generate`), or with
           `decode_path="loop"` a minimal jitted greedy loop over `forward` (prefill, then
           `chunk` fused decode steps per call with the cache donated, per-layer weights) as a
           yardstick for it.
prefill -> `forward(..., cache=<fresh cache>, last_only=True)`, what generation's prefill runs.
train   -> `train.step.build_train_step` with `train.optim.make_optimizer`, state donated.

Each runner's `run()` returns one iteration's timings in seconds: `seconds` (end to end), and
for decode `first_token_s` (prompt in to first token out) and `step_s` (per later token).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.workload import Row, prompt_tokens, train_batch
from infer.engine import engine_params
from infer.generate import complete, generation_scheduler
from infer.layer_views import unstack_layers
from infer.sampling import SamplingParams, first_argmax
from infer.speculative import DEFAULT_DRAFT_TOKENS, resolve_draft
from llama_jax.api import Model
from llama_jax.checkpoint.load import load
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.model import Params, forward, init_params
from llama_jax.quantize import quantize_params
from llama_jax.xla_cpu import train_step_options
from train.optim import OptimConfig, make_optimizer
from train.step import build_train_step, init_train_state

DECODE_CHUNK = 16  # decode steps fused per jitted call in the loop path


def random_params(config: LlamaConfig, seed: int) -> Params:
    """The benchmark weights, drawn once and exported for both sides to load."""
    return jax.block_until_ready(jax.jit(init_params, static_argnums=(0, 1))(config, seed))


def load_model(hf_dir: Path) -> Model:
    """The exported weights, loaded the way users load a checkpoint."""
    model = load(hf_dir, progress=False)
    jax.block_until_ready(model.params)
    return model


def _decode_timings(start: float, first: float, end: float, new_tokens: int) -> dict[str, float]:
    return {
        "seconds": end - start,
        "first_token_s": first - start,
        "step_s": (end - first) / max(new_tokens - 1, 1),
    }


class EngineDecode:
    """Greedy generation through the scheduler `infer.generate.generate` builds, as
    `Model.generate` runs it (the scheduler kept for its acceptance rate); for a
    row with a `draft`, speculatively (one token per call otherwise, the draft built once)."""

    def __init__(self, config: LlamaConfig, params: Params, row: Row, steps_per_call: int):
        self.model = Model(config, params)
        self.prompts = prompt_tokens(row, config.vocab_size).tolist()
        self.row = row
        # never stop early: every row generates `new_tokens`
        self.params = SamplingParams(max_new_tokens=row.new_tokens, stop_token_ids=())
        draft = resolve_draft(row.draft, config, params, DEFAULT_DRAFT_TOKENS)
        self.scheduler = partial(
            generation_scheduler, self.model, self.prompts, self.params, max_batch=row.batch,
            max_len=None, steps_per_call=1 if draft else steps_per_call, draft=draft,
        )  # fmt: skip
        self.tokens: list[list[int]] = []
        self.acceptance_rate: float | None = None

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        scheduler = self.scheduler()
        out = [choices[0] for choices in complete(scheduler, self.prompts, self.params)]
        end = time.perf_counter()
        self.tokens = [c.token_ids for c in out]
        if self.row.draft:
            self.acceptance_rate = scheduler.stats.acceptance_rate
        first = start + min(c.timings["time_to_first_token_s"] for c in out)
        return _decode_timings(start, first, end, self.row.new_tokens)

    def check(self) -> dict[str, Any]:
        extra = {} if self.acceptance_rate is None else {"acceptance_rate": self.acceptance_rate}
        return {"tokens": self.tokens, **extra}


def _prefill_step(params, cache, tokens, *, config):
    logits, cache = forward(params, tokens, cache=cache, config=config, last_only=True)
    return first_argmax(logits[:, -1]), cache


def _decode_steps(params, cache, token, n, *, config, chunk):
    """Up to `chunk` greedy steps (`n` of them run; n is traced, so one compile serves all)."""

    def step(i, carry):
        cache, token, out = carry
        logits, cache = forward(params, token[:, None], cache=cache, config=config)
        token = first_argmax(logits[:, 0])
        return cache, token, out.at[i].set(token)

    out = jnp.zeros((chunk, token.shape[0]), jnp.int32)
    cache, token, out = jax.lax.fori_loop(0, n, step, (cache, token, out))
    return cache, token, out


class LoopDecode:
    """The smallest fast greedy decoder over `forward`: what the engine is measured against.
    It is given per-layer weights (`unstack_layers`), the faster form for decoding on CPU."""

    def __init__(self, config: LlamaConfig, params: Params, row: Row, chunk: int = DECODE_CHUNK):
        self.config, self.params, self.row, self.chunk = config, params, row, chunk
        self.prompt = jnp.asarray(prompt_tokens(row, config.vocab_size))
        self.max_len = 1 << (row.context - 1).bit_length()  # attention spans a bucketed length
        self.prefill = jax.jit(partial(_prefill_step, config=config), donate_argnums=(1,))
        self.decode = jax.jit(
            partial(_decode_steps, config=config, chunk=chunk), donate_argnums=(1,)
        )
        self.tokens: np.ndarray | None = None

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        cache = KVCache.zeros(self.config, self.row.batch, self.max_len)
        token, cache = self.prefill(self.params, cache, self.prompt)
        first_token = np.asarray(token)  # the first token reaches the host: time to first token
        first = time.perf_counter()
        chunks, left = [], self.row.new_tokens - 1
        while left > 0:
            n = min(left, self.chunk)
            cache, token, out = self.decode(self.params, cache, token, n)
            chunks.append(out[:n])
            left -= n
        rest = np.concatenate([np.asarray(c) for c in chunks]) if chunks else np.zeros((0, 1))
        end = time.perf_counter()
        self.tokens = np.concatenate([first_token[None], rest]).T
        return _decode_timings(start, first, end, self.row.new_tokens)

    def check(self) -> dict[str, Any]:
        return {"tokens": self.tokens.tolist()}


class Prefill:
    """Prompt -> cache + last-position logits, one jitted call (a fresh cache each time), over
    the weights in the form the engine gives them (`engine_params`: per-layer on CPU)."""

    def __init__(self, config: LlamaConfig, params: Params, row: Row):
        def prefill(params, tokens):
            cache = KVCache.zeros(config, tokens.shape[0], tokens.shape[1])
            return forward(params, tokens, cache=cache, config=config, last_only=True)

        self.params = engine_params(params, mesh=None)
        self.tokens = jnp.asarray(prompt_tokens(row, config.vocab_size))
        self.fn = jax.jit(prefill)
        self.logits: np.ndarray | None = None

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        logits, cache = self.fn(self.params, self.tokens)
        self.logits = np.asarray(logits[:, -1])
        jax.block_until_ready(cache)
        return {"seconds": time.perf_counter() - start}

    def check(self) -> dict[str, Any]:
        return {"logits": self.logits}


class Train:
    """One AdamW training step (Llama 3 recipe: clipping, warm-up schedule), state donated;
    `loss_chunks` as in `train.step.chunked_sum`."""

    def __init__(self, config: LlamaConfig, params: Params, row: Row, loss_chunks: int = 1):
        optimizer = make_optimizer(OptimConfig(warmup_steps=10))
        # The loader's arrays adopt host memory, which XLA cannot donate: the first step would
        # hold a second copy of the weights. Copies owned by XLA are donated from step one.
        params = jax.tree.map(jnp.copy, params)
        self.state = init_train_state(config, optimizer, params=params)
        self.batch = {k: jnp.asarray(v) for k, v in train_batch(row, config.vocab_size).items()}
        step = build_train_step(config, optimizer, loss_chunks=loss_chunks)
        self.step = jax.jit(step, donate_argnums=(0,), compiler_options=train_step_options())
        self.losses: list[float] = []

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))
        jax.block_until_ready(self.state)
        return {"seconds": time.perf_counter() - start}

    def check(self) -> dict[str, Any]:
        return {"first_loss": self.losses[0]}


def make_runner(
    hf_dir: Path, row: Row, decode_path: str = "engine", steps_per_call: int = DECODE_CHUNK
) -> Any:
    model = load_model(hf_dir)
    config, params = model.config, model.params
    del model  # the runner keeps the only reference: no second copy of the weights
    if row.quantize:
        params = jax.block_until_ready(quantize_params(params, config, row.quantize))
    if row.kind == "prefill":
        return Prefill(config, params, row)
    if row.kind == "train":
        return Train(config, params, row)
    if decode_path == "loop" and not row.draft:  # speculation runs in the engine only
        return LoopDecode(config, unstack_layers(params), row, steps_per_call)
    return EngineDecode(config, params, row, steps_per_call)
