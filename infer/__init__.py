"""Inference: prefill/decode engine, continuous batching, `generate`, CLI and OpenAI server.

Layers, bottom up: `sampling` (per-request settings, the fused sampler), `engine` (bucketed
chunked prefill + one jitted decode step over a donated KV cache), `batching` (the scheduler
that moves requests through decode slots), `generate` (what `Model.generate` calls), and the
front ends `cli` (`python -m llama_jax.infer`) and `server` (`... serve`).
"""

from infer.batching import Request, Scheduler
from infer.engine import Engine, EngineError
from infer.generate import Completion, generate
from infer.sampling import SamplingError, SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "Request",
    "SamplingError",
    "SamplingParams",
    "Scheduler",
    "generate",
]
