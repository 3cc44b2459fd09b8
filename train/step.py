"""The pure training step: masked float32 cross-entropy, gradient accumulation, one AdamW update.

`build_train_step` returns an un-jitted `fn(state, batch) -> (state, metrics)`; the caller jits it
with shardings and donates the state. The loss is the mean over every counted target token of
the whole global batch (not a mean of per-micro-batch means), so gradient accumulation and
sharding change nothing but float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.model import Params, forward, init_params, output_logits, param_shapes
from llama_jax.partitioning import BATCH_AXES, constrain
from train.optim import current_lr

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the data position.

    `rng` is the run's base key (raw uint32[2]); a stochastic layer would use
    `fold_in(rng, step)`, which keeps randomness a function of the step alone.
    """

    step: jax.Array  # int32 scalar: updates applied so far
    params: Params  # float32 master weights
    opt_state: optax.OptState
    rng: jax.Array


def token_losses(
    params: Params, batch: Batch, config: LlamaConfig, loss_chunks: int = 1
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked per-token cross-entropy, number of counted tokens), both float32.

    With `loss_chunks` > 1 the output head and the loss run over that many slices of the
    sequence in turn, each rematerialised in the backward pass, so the float32 logits (and their
    gradient) of only one slice exist at a time: for a 128k vocabulary they are the largest
    activation of the step (2 GiB per 4096 tokens). Slice `j` holds positions j, j + n, j + 2n...
    so each device keeps its part of a sequence-split batch.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    hidden, _ = forward(
        params,
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        config=config,
        hidden_only=True,
    )

    def loss_sum(h: jax.Array, targets: jax.Array, m: jax.Array) -> jax.Array:
        logits = output_logits(params, h, config=config)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * m)

    if loss_chunks == 1:
        return loss_sum(hidden, batch["targets"], mask), jnp.sum(mask)
    b, t = hidden.shape[:2]
    if t % loss_chunks:
        raise ValueError(f"loss_chunks ({loss_chunks}) must divide the sequence length {t}")

    def strided(x: jax.Array) -> jax.Array:  # [b, t, ...] -> [n, b, t / n, ...]
        return jnp.moveaxis(x.reshape(b, t // loss_chunks, loss_chunks, *x.shape[2:]), 2, 0)

    def add_chunk(total: jax.Array, chunk: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + jax.checkpoint(loss_sum)(*chunk), None

    chunks = (strided(hidden), strided(batch["targets"]), strided(mask))
    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), chunks)
    return total, jnp.sum(mask)


def split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """[B, T] -> [grad_accum, B // grad_accum, T], micro-batch i = rows i, i+A, i+2A, ...

    Strided rather than contiguous so that each device's shard of the batch axis holds an equal
    part of every micro-batch: no data moves between devices.
    """

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        if b % grad_accum:
            raise ValueError(f"batch {b} is not divisible by grad_accum {grad_accum}")
        return jnp.swapaxes(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def build_train_step(
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    loss_chunks: int = 1,
) -> StepFn:
    """A pure `fn(state, batch) -> (state, metrics)`; gradients of `grad_accum` micro-batches are
    summed in a `lax.scan` (memory of one micro-batch) before a single update. `loss_chunks`:
    see `token_losses`.

    metrics: loss (mean over counted tokens), grad_norm (before clipping), lr (used by this
    update), loss_tokens (counted targets) and tokens (non-padding positions), all float32.
    """
    grad_fn = jax.value_and_grad(
        partial(token_losses, config=model_config, loss_chunks=loss_chunks), has_aux=True
    )

    def micro_grads(params: Params, micro: Batch) -> tuple[Params, jax.Array, jax.Array]:
        micro = {k: constrain(v, BATCH_AXES) for k, v in micro.items()}
        (loss, n), grads = grad_fn(params, micro)
        return grads, loss, n

    def accumulate(params: Params, carry: tuple, micro: Batch) -> tuple[tuple, None]:
        grads, loss, n = micro_grads(params, micro)
        return jax.tree.map(jnp.add, carry, (grads, loss, n)), None

    def summed_grads(params: Params, batch: Batch) -> tuple[Params, jax.Array, jax.Array]:
        if grad_accum == 1:  # no zero-initialised accumulator: one gradient-sized buffer less
            return micro_grads(params, batch)
        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
        micro = split_micro_batches(batch, grad_accum)
        return jax.lax.scan(partial(accumulate, params), init, micro)[0]

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grads, loss_sum, count = summed_grads(state.params, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": current_lr(opt_state).astype(jnp.float32),
            "loss_tokens": count,
            "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def init_train_state(
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    seed: int = 0,
    params: Params | None = None,
) -> TrainState:
    """Step 0: fresh parameters from `seed` (or the given ones), fresh optimizer moments."""
    if params is None:
        params = init_params(model_config, seed)
    params = jax.tree.map(lambda p: p.astype(model_config.param_dtype), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def abstract_train_state(
    model_config: LlamaConfig, optimizer: optax.GradientTransformation
) -> TrainState:
    """Shapes and dtypes of the train state, nothing allocated."""
    return jax.eval_shape(
        lambda p: init_train_state(model_config, optimizer, params=p), param_shapes(model_config)
    )
