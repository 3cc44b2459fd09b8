"""Reward models: a Llama backbone whose scalar head `score` reads each sequence's last token.

A reward model is a `LlamaConfig` with `num_labels=1`: its param tree is the usual one plus
`"score"`, float [dim, 1] with logical axes ("embed", "labels"), laid out like the `output`
head ([in, out]), so Hugging Face's `score.weight` [1, dim] maps onto it as any linear layer
does. It has no LM head of its own (the config ties one to the embedding; nothing scores its
logits). The reward of a sequence is the final-normed hidden state at its last real token
times `score`, in float32: the pooling of HF's `LlamaForSequenceClassification`, which takes
each row's last token that is not `pad_token_id`.

Checkpoints: `llama_jax.load` reads an HF `LlamaForSequenceClassification` directory (the
checkpoint layout table holds `score.weight`), lazily and sharded like any other; a training
run of objective `reward` stores the head with the rest. `save_reward_model` writes the HF
layout back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.api import Model
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export_hf
from llama_jax.checkpoint.layout import params_getter
from llama_jax.checkpoint.load import load, param_dtype
from llama_jax.checkpoint.placement import ShardingsLike
from llama_jax.config import LlamaConfig
from llama_jax.model import INIT_STD, Params, forward

SCORE = "score"  # the head's key in the param tree


def check_reward_config(config: LlamaConfig, where: str) -> None:
    """Raise `CheckpointError` unless `config` is a reward model (one scalar label)."""
    if config.num_labels != 1:
        kind = "a causal LM" if config.num_labels == 0 else f"{config.num_labels} labels"
        raise CheckpointError(f"{where}: not a reward model (num_labels=1): it has {kind}")


def init_score_head(config: LlamaConfig, seed: int = 0) -> jax.Array:
    """A fresh head [dim, num_labels or 1] in `param_dtype`: normal(0, 0.02), as HF initialises
    `score` (and as `init_params` does for a reward config)."""
    shape = (config.dim, max(config.num_labels, 1))
    noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return (INIT_STD * noise).astype(config.param_dtype)


def token_scores(params: Params, hidden: jax.Array) -> jax.Array:
    """float32 [B, T]: every position's scalar score, `hidden` [B, T, dim] times the head, both
    in float32 (a reward is the score at a sequence's last token)."""
    head = params[SCORE].astype(jnp.float32)[:, 0]
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), head)


def last_token_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: True at the last position of every segment (0 = padding is none). Packed
    segments are contiguous, so a segment ends where the next position's id differs."""
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    return (segment_ids != 0) & (segment_ids != following)


def sequence_rewards(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: LlamaConfig
) -> jax.Array:
    """float32 [B]: the reward of each right-padded row of `tokens` [B, T], its first
    `lengths[b]` ids being the sequence (a row of length 0 scores 0). Pure: jit it with
    `config` static."""
    t = tokens.shape[1]
    segment_ids = (jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden, _ = forward(params, tokens, None, segment_ids, config=config, hidden_only=True)
    scores = token_scores(params, hidden)
    return jnp.sum(jnp.where(last_token_mask(segment_ids), scores, 0.0), axis=1)


def load_reward_model(
    path: str | Path, dtype: str | np.dtype | None = None, shardings: ShardingsLike = None
) -> Model:
    """A reward model from any directory `llama_jax.load` reads (an HF
    `LlamaForSequenceClassification` directory, a reward training run, our Orbax format),
    checked to have one scalar label."""
    model = load(path, dtype, shardings)
    check_reward_config(model.config, str(path))
    return model


def save_reward_model(
    model: Model,
    dst: str | Path,
    dtype: Any = None,
    *,
    pad_token_id: int | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write a reward `Model` as an HF `LlamaForSequenceClassification` directory (config with
    its architecture, `num_labels` 1 and `pad_token_id`, default the tokenizer's pad id;
    weights `model.*` and `score.weight`). Pad ids mark where HF's rows end, so the id must
    never occur inside a scored sequence."""
    check_reward_config(model.config, str(dst))
    if pad_token_id is None and getattr(model.tokenizer, "pad_id", None) is None:
        raise CheckpointError(f"{dst}: name a pad_token_id (the model has no tokenizer)")
    return export_hf(
        model.config,
        params_getter(model.params),
        dst,
        param_dtype(dtype),
        tokenizer=model.tokenizer,
        max_shard_bytes=max_shard_bytes,
        pad_token_id=pad_token_id,
    )
