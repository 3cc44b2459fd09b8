"""Test oracle: a `transformers` Llama holding exactly our parameters.

Other tests (model parity, inference parity) import `hf_model_from_params`; it goes through the
checkpoint package's HF layout mapping, so it checks our forward and that mapping together.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from llama_jax.checkpoint.layout import params_getter, torch_tensors
from llama_jax.config import LlamaConfig, to_hf_config


def hf_model_from_params(config: LlamaConfig, params: dict) -> transformers.LlamaForCausalLM:
    """A float32, eager-attention `LlamaForCausalLM` in eval mode with `params`' weights."""
    hf_config = transformers.LlamaConfig(
        **to_hf_config(config, bos_token_id=0, eos_token_id=0, rope_format="v5")
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config)  # on CPU: rotary buffers must be real
    state = {
        name: torch.from_numpy(np.array(x, dtype=np.float32))
        for name, _, x in torch_tensors(config, params_getter(params), "hf")
    }
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.float().eval()
