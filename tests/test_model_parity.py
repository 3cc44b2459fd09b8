"""Logit parity with Hugging Face `transformers.LlamaForCausalLM` (float32, eager attention)."""

import numpy as np
import pytest

import llama_jax as lj
from llama_jax.rope import inverse_frequencies

torch = pytest.importorskip("torch")
hf_oracle = pytest.importorskip("hf_oracle")

pytestmark = pytest.mark.slow  # every test here runs the transformers oracle

SCALED = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position": 8192,
}
CONFIGS = {
    "gqa": lj.preset("tiny"),
    "tied": lj.preset("tiny-tied"),
    # head_dim 64 so the frequencies span all three bands of the Llama 3.1 scaling
    "scaled8": lj.LlamaConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256,
                              vocab_size=300, rope_theta=500000.0, rope_scaling=SCALED,
                              max_seq_len=131072),
    "scaled32": lj.LlamaConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256,
                               vocab_size=300, rope_theta=500000.0, tie_embeddings=True,
                               rope_scaling={**SCALED, "factor": 32.0}, max_seq_len=131072),
}  # fmt: skip


def _hf_logits(model, tokens, positions):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    config = CONFIGS[name]
    model = lj.init(config, seed=7)
    hf = hf_oracle.hf_model_from_params(config, model.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (3, 24), dtype=np.int32)
    if name.startswith("scaled"):
        # RoPE is relative: a contiguous row at a large offset tests nothing. Half the row sits at
        # 0.., half at 40000.., so queries see keys more than 8192 and 32768 positions away.
        positions = np.concatenate([np.arange(12), 40000 + np.arange(12)])[None].repeat(3, 0)
    else:
        positions = np.arange(24)[None].repeat(3, 0)
    ours = model.logits(tokens, positions=positions)
    theirs = _hf_logits(hf, tokens, positions)
    assert np.abs(theirs).max() > 0.1  # typical magnitude, not all ~0
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["scaled8", "scaled32"])
def test_inverse_frequencies_bit_equal_to_transformers(name):
    """Angles at position 40000 only agree if the scaled frequencies agree to the bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = CONFIGS[name]
    hf = hf_oracle.hf_model_from_params(config, lj.init_params(config, 0))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    ours = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert (ours != inverse_frequencies(config.head_dim, config.rope_theta, None)).any()
