"""Config presets, Meta params.json and HF config.json readers/writers."""

import json
from pathlib import Path

import jax
import pytest

import llama_jax as lj
from llama_jax.config import ConfigError, meta_ffn_dim, to_meta_params

EXPECTED_PARAMS = {
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.3-70b": 70_553_706_496,
    "bench-155m": 155_460_096,
}

# Meta's published params.json files, as shipped with the checkpoints.
META_PARAMS = {
    "llama3.1-8b": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                    "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True, "vocab_size": 128256},
    "llama3.1-405b": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
                      "vocab_size": 128256, "ffn_dim_multiplier": 1.2, "multiple_of": 4096,
                      "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    "llama3.2-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                    "vocab_size": 128256, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
                    "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "rope_scaling_factor": 32.0},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_eval_shape_param_counts_exact(name):
    config = lj.preset(name)
    shapes = lj.param_shapes(config)  # abstract: nothing is allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    total = sum(x.size for x in jax.tree.leaves(shapes))
    assert total == EXPECTED_PARAMS[name] == config.param_count()


def test_logical_axes_cover_every_dimension():
    config = lj.preset("llama3.2-1b")
    shapes, axes = lj.param_shapes(config), lj.logical_axes(config)
    for shape, names in zip(
        jax.tree.leaves(shapes),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
        strict=True,
    ):
        assert len(names) == len(shape.shape)
    assert "output" not in shapes  # 3.2-1B ties its output head to the embedding


@pytest.mark.parametrize("name", sorted(META_PARAMS))
def test_meta_params_json_reproduces_preset(name, tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS[name]))
    config = lj.from_meta_params(path)
    want = lj.preset(name)
    for field in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "ffn_dim",
        "vocab_size",
        "rope_theta",
        "rope_scaling",
    ):
        assert getattr(config, field) == getattr(want, field), field


def test_rope_scaling_factor_is_read_not_guessed():
    assert lj.from_meta_params(META_PARAMS["llama3.2-1b"]).rope_scaling.factor == 32.0
    assert lj.from_meta_params(META_PARAMS["llama3.1-8b"]).rope_scaling.factor == 8.0
    plain = {**META_PARAMS["llama3.1-8b"], "use_scaled_rope": False}
    assert lj.from_meta_params(plain).rope_scaling is None


def test_meta_ffn_formula():
    assert meta_ffn_dim(4096, 1024, 1.3) == 14336
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672
    assert meta_ffn_dim(64, 4, None) == 172  # stories260K


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-3b", "llama3-70b", "tiny-tied"])
@pytest.mark.parametrize("rope_format", ["v4", "v5"])
def test_hf_config_round_trip(name, rope_format):
    config = lj.preset(name)
    hf = lj.to_hf_config(config, rope_format=rope_format)
    assert ("rope_parameters" in hf) == (rope_format == "v5")
    assert lj.from_hf_config(hf) == config


# Meta's own config.json files for two models, as published on the Hugging Face hub.
LLAMA_3_1_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_3_2_1B_CONFIG = {
    **LLAMA_3_1_8B_CONFIG,
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "rope_scaling": {**LLAMA_3_1_8B_CONFIG["rope_scaling"], "factor": 32.0},
    "tie_word_embeddings": True,
    "transformers_version": "4.45.0.dev0",
}


@pytest.mark.parametrize(
    ("name", "official"),
    [("llama3.1-8b", LLAMA_3_1_8B_CONFIG), ("llama3.2-1b", LLAMA_3_2_1B_CONFIG)],
)
def test_preset_is_the_official_config(name, official):
    """A preset holds the architecture only: exactly what the model's own config.json says."""
    assert lj.preset(name) == lj.from_hf_config(official)


def test_presets_inherit_from_base_entries():
    table = json.loads((Path(lj.__file__).parent / "presets.json").read_text())
    assert "_llama3.1" in table and "_llama3.1" not in lj.preset_names()
    assert "max_seq_len" not in table["llama3.1-405b"]
    assert lj.preset("llama3.1-405b").max_seq_len == 131072
    policy = {"param_dtype", "compute_dtype", "remat"}
    assert not any(policy & set(entry) for entry in table.values())


@pytest.mark.slow
def test_hf_config_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    hf = lj.to_hf_config(lj.preset("llama3.2-1b"))
    tc = transformers.LlamaConfig(**hf)
    assert tc.rope_parameters["rope_type"] == "llama3"
    assert tc.rope_parameters["factor"] == 32.0
    assert lj.from_hf_config(tc.to_dict()).rope_scaling == lj.preset("llama3.2-1b").rope_scaling


def test_meta_params_writer_round_trip():
    for name in ("llama3.1-8b", "llama3.1-405b", "llama3.2-1b", "tiny"):
        config = lj.preset(name)
        back = lj.from_meta_params(to_meta_params(config))
        assert back.ffn_dim == config.ffn_dim and back.rope_scaling == config.rope_scaling


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"dim": 64, "n_layers": 2, "n_heads": 3, "n_kv_heads": 2, "vocab_size": 8},
            "multiple of n_kv_heads",
        ),
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}, "vocab_size"),
        ({"n_layers": 2, "n_heads": 4, "vocab_size": 8}, "'dim'"),
    ],
)
def test_bad_meta_params_name_the_problem(bad, message, tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=message) as err:
        lj.from_meta_params(path)
    assert str(path) in str(err.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match=r"llama3\.1-8b"):
        lj.preset("llama9")


def test_unsupported_rope_type_rejected():
    hf = lj.to_hf_config(lj.preset("tiny"))
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn"):
        lj.from_hf_config(hf)
