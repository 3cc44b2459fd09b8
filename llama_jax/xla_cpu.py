"""XLA:CPU compiler options for the training step, applied per compilation (CPU only).

jaxlib 0.12's CPU backend hands dots to YNNPACK fusions by default. For the training step
(the output head's [tokens, vocab] products and their gradients dominate it) YNNPACK ran the
`bench-155m` step ~1.7x slower than XLA's own dot emitter on 2 cores (9.7 vs 5.7 s per step,
`python -m benchmarks.profile train_b4x256`), while decode and prefill gained nothing from
turning it off. So the option is set on the train step's `jax.jit` alone rather than in
`XLA_FLAGS`, and only when the step runs on CPU: other backends reject CPU options.
"""

from __future__ import annotations

from typing import Any

import jax

# An empty list of YNNPACK fusion kinds: every dot and elementwise op stays with XLA's emitters.
TRAIN_STEP_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def train_step_options(platform: str | None = None) -> dict[str, Any] | None:
    """`compiler_options` for `jax.jit` of a train step on `platform` (default: JAX's default
    backend); None off the CPU."""
    return TRAIN_STEP_OPTIONS if (platform or jax.default_backend()) == "cpu" else None
