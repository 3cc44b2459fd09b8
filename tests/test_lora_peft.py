"""LoRA adapters as Hugging Face PEFT directories: merging, saving, loading (ours and PEFT's),
`convert --merge-lora`, `infer --lora`, and the errors a wrong adapter gives."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from infer.cli import main as infer_main
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.peft import load_peft, merge_into, save_peft
from llama_jax.checkpoint.safetensors_io import SafetensorsFile
from llama_jax.convert import main as convert_main
from llama_jax.lora import LoraConfig, LoraError, adapters_for, init_adapters, merge
from llama_jax.model import forward
from sharding.mesh import make_mesh
from sharding.place import place

CONFIGS = {"untied": lj.preset("tiny"), "tied": lj.preset("tiny-tied")}
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 12), dtype=np.int32)


def _random_adapters(config: lj.LlamaConfig, lora: LoraConfig, seed: int = 1) -> dict:
    """Adapters with non-zero `b`, large enough to move the logits visibly."""
    weights = init_adapters(config, lora, seed)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), weights)


def _adapted_logits(config, params, weights, lora: LoraConfig, tokens=TOKENS) -> np.ndarray:
    """Logits of the base `params` running `weights` as adapters (not merged)."""

    def run(p, w, t):
        return forward(p, t, config=config, adapters=adapters_for(w, lora))[0]

    return np.asarray(jax.jit(run)(params, weights, jnp.asarray(tokens)))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapters_give_the_logits_of_the_merged_model(name):
    config = CONFIGS[name]
    base = lj.init(config, seed=3)
    weights = _random_adapters(config, LORA)
    adapted = _adapted_logits(config, base.params, weights, LORA)
    merged = lj.Model(config, merge(base.params, weights, LORA)).logits(TOKENS)
    assert _max_diff(adapted, base.logits(TOKENS)) > 1e-2  # the adapter does something
    assert _max_diff(adapted, merged) <= 1e-5


def test_save_load_round_trip_is_bit_exact_in_peft_names_and_layouts(tmp_path):
    config = CONFIGS["untied"]
    lora = LoraConfig(rank=4, alpha=16.0, targets=("q", "o", "down"), dropout=0.1, rslora=True)
    weights = _random_adapters(config, lora)
    out = save_peft(weights, lora, config, tmp_path / "adapter", base_model="tiny")
    loaded, lora_back = load_peft(out, config)
    assert lora_back == lora
    assert jax.tree.structure(loaded) == jax.tree.structure(weights)
    for ours, back in zip(jax.tree.leaves(weights), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), back)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "o_proj", "down_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (
        4,
        16.0,
        True,
        "LORA",
    )
    file = SafetensorsFile(out / "adapter_model.safetensors")
    heads = config.n_heads * config.head_dim
    prefix = "base_model.model.model.layers.1"
    assert file.entries[f"{prefix}.self_attn.q_proj.lora_B.weight"].shape == (heads, 4)
    assert file.entries[f"{prefix}.self_attn.o_proj.lora_A.weight"].shape == (4, heads)
    assert file.entries[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (4, config.ffn_dim)
    assert len(file.names()) == 3 * 2 * config.n_layers
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind


def test_saving_over_an_adapter_replaces_it_and_refuses_other_directories(tmp_path):
    config = CONFIGS["tied"]
    first, second = _random_adapters(config, LORA, 1), _random_adapters(config, LORA, 2)
    save_peft(first, LORA, config, tmp_path / "a")
    save_peft(second, LORA, config, tmp_path / "a")
    loaded, _ = load_peft(tmp_path / "a", config)
    np.testing.assert_array_equal(loaded["attention"]["wq"]["b"], second["attention"]["wq"]["b"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="neither empty nor a PEFT adapter"):
        save_peft(first, LORA, config, tmp_path / "other")


def test_merge_into_keeps_dtype_and_sharding(tmp_path):
    config = CONFIGS["untied"].replace(param_dtype="bfloat16")
    mesh = make_mesh("fsdp=4,tensor=2")
    base = lj.init(config, seed=3)
    base.params, base.mesh = place(base.params, config, mesh, "fsdp_tp"), mesh
    shardings = jax.tree.map(lambda x: x.sharding, base.params)
    weights = _random_adapters(config, LORA)
    expected = jax.tree.map(np.asarray, merge(base.params, weights, LORA))  # base is donated
    merged = merge_into(base, save_peft(weights, LORA, config, tmp_path / "a"))
    assert jax.tree.map(lambda x: x.sharding, merged.params) == shardings
    assert len(merged.params["layers"]["attention"]["wq"].sharding.device_set) == 8
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged.params))
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(merged.params), strict=True):
        np.testing.assert_array_equal(want, np.asarray(got))


# --- against PEFT and transformers ----------------------------------------------------------


def _torch_logits(model, tokens=TOKENS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_our_adapter_loads_in_peft_with_our_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    hf_oracle = pytest.importorskip("hf_oracle")
    config = CONFIGS[name]
    base = lj.init(config, seed=3)
    weights = _random_adapters(config, LORA)
    save_peft(weights, LORA, config, tmp_path / "adapter")
    hf = hf_oracle.hf_model_from_params(config, base.params)
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = _adapted_logits(config, base.params, weights, LORA)
    assert _max_diff(ours, base.logits(TOKENS)) > 1e-2
    assert _max_diff(_torch_logits(adapted), ours) <= 1e-4


PEFT_SETTINGS = {
    "all": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"]),
    "subset": dict(target_modules=["v_proj", "o_proj", "up_proj"]),
    "rslora": dict(target_modules=["q_proj", "down_proj"], use_rslora=True),
    "regex": dict(target_modules=r".*\.self_attn\.(k|o)_proj"),
    "some_layers": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
}  # fmt: skip


def _peft_adapter(config, params, out: Path, seed: int = 0, **settings):
    """A PEFT-made adapter on transformers' copy of `params`, `lora_B` set non-zero, saved to
    `out`; returns the adapted PEFT model."""
    import peft
    import torch

    hf_oracle = pytest.importorskip("hf_oracle")
    hf = hf_oracle.hf_model_from_params(config, params)
    lora = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **settings)
    model = peft.get_peft_model(hf, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(PEFT_SETTINGS))
def test_peft_adapter_loads_with_peft_logits(setting, tmp_path):
    pytest.importorskip("peft")
    config = CONFIGS["untied"]
    base = lj.init(config, seed=3)
    theirs = _peft_adapter(config, base.params, tmp_path / "a", **PEFT_SETTINGS[setting])
    weights, lora = load_peft(tmp_path / "a", config)
    assert lora.scale == (8 / 2 if setting == "rslora" else 8 / 4)
    ours = _adapted_logits(config, base.params, weights, lora)
    assert _max_diff(ours, base.logits(TOKENS)) > 1e-2
    assert _max_diff(_torch_logits(theirs), ours) <= 1e-4


@pytest.mark.slow
def test_adapter_for_another_dim_names_file_and_module(tmp_path):
    pytest.importorskip("peft")
    config = CONFIGS["untied"]
    other = config.replace(dim=32)
    _peft_adapter(other, lj.init(other).params, tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(LoraError) as e:
        load_peft(tmp_path / "a", config)
    message = str(e.value)
    assert "\n" not in message and "adapter_model.safetensors" in message
    assert "model.layers.0.self_attn.q_proj lora_A has shape (4, 32)" in message
    assert "needs (4, 64)" in message and "another base model?" in message


# --- the CLIs --------------------------------------------------------------------------------


def _run_infer(capsys, *args) -> tuple[int, str, str]:
    code = infer_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_merge_lora_and_infer_lora_give_the_adapted_model(tmp_path, capsys):
    config = CONFIGS["untied"]
    base = lj.init(config, seed=3)
    weights = _random_adapters(config, LORA)
    adapted = _adapted_logits(config, base.params, weights, LORA)
    lj.export(base, tmp_path / "base", "hf")
    save_peft(weights, LORA, config, tmp_path / "adapter")
    args = [tmp_path / "base", tmp_path / "merged", "--to", "hf", "--no-progress"]
    assert convert_main([str(a) for a in args] + ["--merge-lora", str(tmp_path / "adapter")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert _max_diff(lj.load(tmp_path / "merged").logits(TOKENS), adapted) <= 1e-5
    generate = ["--prompt-ids", "1,2,3,4", "--max-new-tokens", 8, "--json", "--max-seq-len", 64]
    runs = {}
    for what, flags in {
        "lora": ["--checkpoint", tmp_path / "base", "--lora", tmp_path / "adapter"],
        "merged": ["--checkpoint", tmp_path / "merged"],
        "base": ["--checkpoint", tmp_path / "base"],
    }.items():
        code, out, err = _run_infer(capsys, *flags, *generate)
        assert code == 0, err
        runs[what] = json.loads(out)["generated_ids"]
    assert len(runs["lora"]) == 8 and runs["lora"] == runs["merged"]
    assert runs["lora"] != runs["base"]


def test_clis_report_a_bad_adapter_in_one_line(tmp_path, capsys):
    config = CONFIGS["untied"]
    lj.export(lj.init(config), tmp_path / "base", "hf")
    save_peft(_random_adapters(config, LORA), LORA, config, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", use_dora=True)
    code, out, err = _run_infer(capsys, "--checkpoint", tmp_path / "base", "--lora",
                                tmp_path / "adapter", "--prompt-ids", "1")  # fmt: skip
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "adapter_config.json: use_dora=True (DoRA)" in err
    args = [tmp_path / "base", tmp_path / "out", "--to", "hf", "--merge-lora", tmp_path / "adapter"]
    assert convert_main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use_dora=True (DoRA) is not supported" in err


# --- bad adapters ----------------------------------------------------------------------------


def _edit_config(root: Path, **changes) -> None:
    path = root / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def adapter(tmp_path) -> Path:
    config = CONFIGS["untied"]
    return save_peft(_random_adapters(config, LORA), LORA, config, tmp_path / "adapter")


def test_unknown_target_is_named():
    with pytest.raises(LoraError, match="no projection named qq; known: q,k,v,o,gate,up,down"):
        LoraConfig(rank=4, alpha=8.0, targets=("qq",))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, r"use_dora=True \(DoRA\) is not supported"),
        ({"peft_type": "IA3"}, r"peft_type 'IA3': only LORA"),
        ({"bias": "all"}, r"bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
        ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern=.* \(per-module ranks\)"),
        ({"target_modules": ["q_proj", "qq_proj"]}, r"target module 'qq_proj' is not one of"),
        (
            {"target_modules": ["q_proj", "lm_head"]},
            r"adapts lm_head; only q_proj,k_proj,.*,down_proj are supported",
        ),
        ({"target_modules": ["embed_tokens"]}, r"adapts model.embed_tokens"),
        ({"target_modules": r".*\.mlp"}, r"matches no projection of the model"),
        ({"target_modules": ["q_proj"]}, r"k_proj.lora_A.weight: its module is not in target"),
        ({"layers_to_transform": [0, 2]}, r"names layer 2, but the base model has 2 layers"),
        ({"r": 8}, r"q_proj lora_A has shape \(4, 64\), the base model needs \(8, 64\)"),
    ],
)
def test_unsupported_or_mismatched_config_is_one_line_naming_it(adapter, changes, message):
    _edit_config(adapter, **changes)
    with pytest.raises(LoraError, match=message) as e:
        load_peft(adapter, CONFIGS["untied"])
    assert "\n" not in str(e.value) and str(adapter) in str(e.value)


def test_layers_beyond_the_base_model_are_named(tmp_path):
    deeper = CONFIGS["untied"].replace(n_layers=3)
    save_peft(_random_adapters(deeper, LORA), LORA, deeper, tmp_path / "a")
    with pytest.raises(LoraError, match=r"layers\.2\..*: layer 2, but the base model has 2"):
        load_peft(tmp_path / "a", CONFIGS["untied"])


def test_missing_files_are_named(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: file not found"):
        load_peft(adapter, CONFIGS["untied"])
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"adapter_config.json: not found"):
        load_peft(adapter, CONFIGS["untied"])


def test_regex_target_modules_select_the_projections(tmp_path):
    config = CONFIGS["untied"]
    lora = LoraConfig(4, 8.0, targets=("q", "v"))
    weights = _random_adapters(config, lora)
    save_peft(weights, lora, config, tmp_path / "a")
    _edit_config(tmp_path / "a", target_modules=r".*\.(q_proj|v_proj)")
    loaded, lora_back = load_peft(tmp_path / "a", config)
    assert lora_back == lora
    np.testing.assert_array_equal(loaded["attention"]["wv"]["a"], weights["attention"]["wv"]["a"])
