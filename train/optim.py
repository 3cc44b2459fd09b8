"""AdamW with the Llama 3 recipe: linear warm-up, cosine decay to a floor, global-norm clipping.

Moments live in the parameters' dtype (float32 master weights), whatever the compute dtype.
The learning rate is injected into the optimizer state (`optax.inject_hyperparams`) so the value
actually used by each update can be read back and logged, rather than recomputed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llama_jax.model import Params

# Parameters that are not matrices multiplying activations: the RMSNorm scales and the input
# embedding table. Llama-style recipes often exempt them from weight decay.
NO_DECAY_NAMES = ("attention_norm", "ffn_norm", "norm", "tok_embeddings")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule settings; defaults are the Llama 3 paper's.

    `decay_steps` is where the cosine reaches `min_lr_ratio * lr`; 0 means the run's step count.
    """

    lr: float = 3e-4
    warmup_steps: int = 2000
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    decay_norms_and_embeddings: bool = True


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine to `min_lr_ratio * lr`, flat after that.

    Update `n` (0-based) uses the base schedule at `n + 1`, so the first update already moves
    (lr / warmup_steps) instead of spending a step at zero.
    """
    decay_steps = cfg.decay_steps or total_steps
    if decay_steps <= cfg.warmup_steps:  # no room (or no run length) for decay: warm up, hold
        base = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    else:
        base = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=decay_steps,
            end_value=cfg.lr * cfg.min_lr_ratio,
        )
    return lambda count: base(count + 1)


def decay_mask(params: Params) -> Any:
    """True for parameters that get weight decay: all but norms and the input embedding."""

    def keep(path: tuple[Any, ...], _: Any) -> bool:
        return getattr(path[-1], "key", None) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int = 0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the scheduled learning rate."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args="mask", hyperparam_dtype=jnp.float32)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        adamw(
            learning_rate=make_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=None if cfg.decay_norms_and_embeddings else decay_mask,
        ),
    )


def current_lr(opt_state: optax.OptState) -> jax.Array:
    """The learning rate the last update used: the injected hyperparameter of the AdamW stage
    (second in the chain `make_optimizer` builds)."""
    return opt_state[1].hyperparams["learning_rate"]
