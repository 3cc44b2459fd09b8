"""llama-jax: Meta's Llama 3.x model family in JAX + Flax NNX."""

from llama_jax.api import Model, init
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.load import load
from llama_jax.config import (
    ConfigError,
    LlamaConfig,
    RopeScaling,
    from_hf_config,
    from_meta_params,
    preset,
    preset_names,
    to_hf_config,
)
from llama_jax.kv_cache import KVCache
from llama_jax.model import forward, init_params, logical_axes, param_shapes
from llama_jax.sentencepiece_tokenizer import SentencePieceTokenizer
from llama_jax.tokenizer import StreamingDetokenizer, Tokenizer, find_tokenizer, open_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "LlamaConfig",
    "Model",
    "RopeScaling",
    "SentencePieceTokenizer",
    "StreamingDetokenizer",
    "Tokenizer",
    "export",
    "find_tokenizer",
    "forward",
    "from_hf_config",
    "from_meta_params",
    "init",
    "init_params",
    "load",
    "logical_axes",
    "open_tokenizer",
    "param_shapes",
    "preset",
    "preset_names",
    "to_hf_config",
]
