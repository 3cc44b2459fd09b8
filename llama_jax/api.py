"""The small public API shared by users, later code and tests.

`init(config, seed)` gives a `Model`: a config, a pure-dict parameter tree and (optionally) a
mesh and a tokenizer. Its methods jit the pure `forward` once per shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.model import Params, forward, init_params


@dataclass
class Model:
    """A Llama model: `config`, `params` (pure dict of arrays), optional `tokenizer` and `mesh`."""

    config: LlamaConfig
    params: Params
    tokenizer: Any = None
    mesh: jax.sharding.Mesh | None = None
    _jitted: dict[str, Any] = field(default_factory=dict, repr=False)

    def logits(self, tokens: Any, positions: Any = None, segment_ids: Any = None) -> np.ndarray:
        """float32 numpy [batch, time, vocab] for int tokens [batch, time]."""
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        self.config.check_token_ids(tokens)
        tokens = jnp.asarray(tokens)
        if positions is not None:
            positions = jnp.asarray(np.asarray(positions, dtype=np.int32))
        if segment_ids is not None:
            segment_ids = jnp.asarray(np.asarray(segment_ids, dtype=np.int32))
        fn = self._jitted.get("logits")
        if fn is None:
            fn = jax.jit(partial(_logits, config=self.config))
            self._jitted["logits"] = fn
        return np.asarray(fn(self.params, tokens, positions, segment_ids))

    def generate(self, prompts: Any, **sampling: Any) -> Any:
        """Generate from text or token ids (one prompt or a list); see `infer.generate.generate`
        for the sampling settings and the `Completion` it returns."""
        from infer.generate import generate  # lazy: the core must not import infer

        return generate(self, prompts, **sampling)


def _logits(params, tokens, positions, segment_ids, *, config):
    return forward(params, tokens, positions, segment_ids, config=config)[0]


def init(config: LlamaConfig, seed: int = 0) -> Model:
    """A model with random parameters (normal(0, 0.02) weights, unit norms)."""
    params = jax.jit(init_params, static_argnums=(0, 1))(config, seed)
    return Model(config=config, params=params)
