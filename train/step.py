"""The pure training step: an objective's loss, gradient accumulation, one AdamW update.

`build_step(objective, optimizer)` returns an un-jitted `fn(state, batch, frozen) -> (state,
metrics)`; the caller jits it with shardings and donates the state (never `frozen`). An
objective (`Objective`: language modelling here, DPO and distillation in their modules) returns
sums over its units (tokens, pairs) and their count; the loss is the sum over the whole global
batch divided by the global count (not a mean of per-micro-batch means), so gradient
accumulation and sharding change nothing but float rounding. `Policy` says what is trained:
every weight, or LoRA adapters over a frozen base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.lora import LoraConfig, adapters_for, init_adapters
from llama_jax.model import Adapters, Params, forward, init_params, output_logits, param_shapes
from llama_jax.partitioning import BATCH_AXES, constrain
from train.optim import current_lr

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Frozen = dict[str, Params]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
BASE = "base"  # the key of a LoRA run's frozen base weights in `frozen`


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the data position.

    `rng` is the run's base key (raw uint32[2]); a stochastic layer would use
    `fold_in(rng, step)`, which keeps randomness a function of the step alone.
    """

    step: jax.Array  # int32 scalar: updates applied so far
    params: Params  # the trained tree in float32: all weights, or the LoRA adapters only
    opt_state: optax.OptState
    rng: jax.Array


@dataclass(frozen=True)
class Policy:
    """How the trained model runs. Full fine-tuning: the trainable tree is the params. LoRA:
    the trainable tree is the adapters, over frozen base weights `frozen["base"]` (held in the
    compute dtype; no gradients, no optimizer state)."""

    config: LlamaConfig
    lora: LoraConfig | None = None

    def params(self, trainable: Params, frozen: Frozen) -> Params:
        """The model's weights (the output head's too)."""
        return trainable if self.lora is None else frozen[BASE]

    def adapters(self, trainable: Params, rng: jax.Array | None) -> Adapters | None:
        return None if self.lora is None else adapters_for(trainable, self.lora, rng)

    def hidden(
        self,
        trainable: Params,
        frozen: Frozen,
        batch: Batch,
        rng: jax.Array | None = None,
        *,
        adapted: bool = True,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, dim] of the batch; `adapted=False` switches the
        adapters off (the LoRA base, e.g. DPO's reference policy)."""
        adapters = self.adapters(trainable, rng) if adapted else None
        hidden, _ = forward(
            self.params(trainable, frozen),
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            config=self.config,
            hidden_only=True,
            adapters=adapters,
        )
        return hidden


class LossParts(NamedTuple):
    """One micro-batch's share of an objective. Over the whole batch the loss is
    sum(loss_sum) / sum(count); `means` are summed likewise and divided by the same count;
    `totals` are reported as summed (token counts)."""

    loss_sum: jax.Array
    count: jax.Array
    means: Metrics
    totals: Metrics


# (trainable params, frozen trees, micro-batch, rng) -> LossParts; differentiated in its first
# argument only.
Objective = Callable[[Params, "Frozen", Batch, jax.Array], LossParts]


def chunked_sum(fn: Callable[..., Any], arrays: tuple[jax.Array, ...], chunks: int) -> Any:
    """`fn(*arrays)` (a pytree of sums) computed over `chunks` slices of the sequence axis in
    turn and added up; each slice is rematerialised in the backward pass.

    Why: `fn` applies the output head, and the float32 logits (and their gradient) of only one
    slice then exist at a time: for a 128k vocabulary they are the largest activation of the
    step (2 GiB per 4096 tokens). Slice `j` holds positions j, j + n, j + 2n... so each device
    keeps its part of a sequence-split batch. Every array is [B, T, ...].
    """
    if chunks == 1:
        return fn(*arrays)
    sliced = tuple(_strided(x, chunks) for x in arrays)
    first = jax.tree.map(lambda x: x[0], sliced)
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, *first))

    def add_chunk(total: Any, chunk: tuple[jax.Array, ...]) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, jax.checkpoint(fn)(*chunk)), None

    return jax.lax.scan(add_chunk, zero, sliced)[0]


def chunked_map(fn: Callable[..., jax.Array], arrays: tuple[jax.Array, ...], chunks: int):
    """`fn(*arrays)` -> [B, T] per-token values, computed over `chunks` slices of the sequence
    axis in turn (the slices of `chunked_sum`), for the same reason: one slice's logits at a
    time. For passes without gradients (log-probs of a frozen or old policy)."""
    if chunks == 1:
        return fn(*arrays)
    out = jax.lax.map(lambda chunk: fn(*chunk), tuple(_strided(x, chunks) for x in arrays))
    n, b, part = out.shape
    return jnp.moveaxis(out, 0, 2).reshape(b, part * n)


def _strided(x: jax.Array, chunks: int) -> jax.Array:
    """[b, t, ...] -> [chunks, b, t / chunks, ...], slice j holding positions j, j + n, ..."""
    b, t = x.shape[:2]
    if t % chunks:
        raise ValueError(f"loss_chunks ({chunks}) must divide the sequence length {t}")
    return jnp.moveaxis(x.reshape(b, t // chunks, chunks, *x.shape[2:]), 2, 0)


def cross_entropy_sum(
    params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    config: LlamaConfig,
    loss_chunks: int = 1,
) -> jax.Array:
    """Sum of the masked cross-entropy of `targets` under the head applied to `hidden`."""

    def loss_sum(h: jax.Array, t: jax.Array, m: jax.Array) -> jax.Array:
        logits = output_logits(params, h, config=config)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * m)

    return chunked_sum(loss_sum, (hidden, targets, mask), loss_chunks)


def lm_objective(policy: Policy, loss_chunks: int = 1) -> Objective:
    """Next-token cross-entropy over the counted targets (pretraining, and SFT with its mask)."""

    def objective(trainable: Params, frozen: Frozen, batch: Batch, rng: jax.Array) -> LossParts:
        mask = batch["loss_mask"].astype(jnp.float32)
        hidden = policy.hidden(trainable, frozen, batch, rng)
        params = policy.params(trainable, frozen)
        loss = cross_entropy_sum(params, hidden, batch["targets"], mask, policy.config, loss_chunks)
        n = jnp.sum(mask)
        tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
        return LossParts(loss, n, {}, {"loss_tokens": n, "tokens": tokens})

    return objective


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


def build_step(
    objective: Objective, optimizer: optax.GradientTransformation, *, grad_accum: int = 1
) -> Callable[[TrainState, Batch, Frozen], tuple[TrainState, Metrics]]:
    """A pure `fn(state, batch, frozen) -> (state, metrics)` for any objective; gradients of
    `grad_accum` micro-batches are summed in a `lax.scan` (memory of one micro-batch) before a
    single update. `frozen` holds the trees the objective reads but never trains (a LoRA base,
    a reference policy, a teacher); pass it undonated.

    metrics: loss (sum over the batch / its count), grad_norm (before clipping), lr (used by
    this update), the objective's means and totals, all float32. The objective's rng for
    micro-batch i of update s is `fold_in(fold_in(state.rng, s), i)`.
    """

    def micro_parts(params: Params, frozen: Frozen, micro: Batch, rng: jax.Array):
        micro = {k: constrain(v, BATCH_AXES[: v.ndim]) for k, v in micro.items()}
        return jax.value_and_grad(
            lambda p: _as_value(objective(p, frozen, micro, rng)), has_aux=True
        )(params)

    def summed(state: TrainState, frozen: Frozen, batch: Batch) -> tuple[LossParts, Params]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum == 1:  # no zero-initialised accumulator: one gradient-sized buffer less
            (_, parts), grads = micro_parts(state.params, frozen, batch, key)
            return parts, grads
        micro = split_micro_batches(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: micro_parts(state.params, frozen, first, key))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))

        def accumulate(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            one, i = xs
            (_, parts), grads = micro_parts(state.params, frozen, one, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (parts, grads)), None

        steps = jnp.arange(grad_accum, dtype=jnp.int32)
        return jax.lax.scan(accumulate, init, (micro, steps))[0]

    def train_step(state: TrainState, batch: Batch, frozen: Frozen) -> tuple[TrainState, Metrics]:
        parts, grads = summed(state, frozen, batch)
        denom = jnp.maximum(parts.count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": parts.loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": current_lr(opt_state).astype(jnp.float32),
            **{k: v / denom for k, v in parts.means.items()},
            **parts.totals,
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def _as_value(parts: LossParts) -> tuple[jax.Array, LossParts]:
    """The differentiated value (the summed loss) and the parts as auxiliary output."""
    return parts.loss_sum, parts


def build_train_step(
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    loss_chunks: int = 1,
) -> StepFn:
    """The language-model step of a model trained whole (pretraining, full SFT):
    `fn(state, batch) -> (state, metrics)`, see `build_step`. `loss_chunks`: see `chunked_sum`.

    metrics: loss (mean over counted tokens), grad_norm, lr, loss_tokens (counted targets) and
    tokens (non-padding positions).
    """
    step = build_step(
        lm_objective(Policy(model_config), loss_chunks), optimizer, grad_accum=grad_accum
    )
    return lambda state, batch: step(state, batch, {})


def init_train_state(
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    seed: int = 0,
    params: Params | None = None,
    lora: LoraConfig | None = None,
) -> TrainState:
    """Step 0: the trained tree and fresh optimizer moments. Trained whole: fresh parameters
    from `seed` (or the given ones) in `param_dtype`; with `lora`: fresh float32 adapters (the
    base weights are not part of the state)."""
    if lora is not None:
        params = init_adapters(model_config, lora, seed)
    else:
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
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    lora: LoraConfig | None = None,
) -> TrainState:
    """Shapes and dtypes of the train state, nothing allocated."""
    if lora is not None:
        return jax.eval_shape(lambda: init_train_state(model_config, optimizer, lora=lora))
    return jax.eval_shape(
        lambda p: init_train_state(model_config, optimizer, params=p), param_shapes(model_config)
    )
