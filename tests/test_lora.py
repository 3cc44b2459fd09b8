"""LoRA training: only adapters are trained and hold optimizer state, the base stays frozen in
the compute dtype, adapters are placed by the rule table, runs resume exactly (on a TP mesh, with
accumulation), a run directory loads as the merged model, and LoRA lowers the loss as full
fine-tuning does."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from synthetic import arithmetic_jsonl

from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.peft import load_peft
from llama_jax.config import preset
from llama_jax.lora import LoraConfig, adapters_for, init_adapters, merge
from llama_jax.model import forward, init_params
from llama_jax.train import main as train_main
from sharding.mesh import make_mesh
from sharding.place import tree_shardings
from train.config import load_config
from train.loop import run
from train.optim import OptimConfig, make_optimizer
from train.step import Policy, abstract_train_state, build_step, init_train_state, lm_objective

TINY = preset("tiny")
LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arithmetic.jsonl", 2000)


def _settings(corpus: Path, **overrides) -> dict:
    """A tiny float32 run on the arithmetic corpus, LoRA rank 4 unless overridden."""
    base = {
        "model": "tiny",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"paths": [str(corpus)], "seq_len": 64, "batch": 8, "tokenizer": "bytes"},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0},
        "lora": {"rank": 4, "alpha": 8.0},
        "steps": 6,
        "mesh": "fsdp=-1",
        "save_every": 3,
        "log_every": 3,
        "peak_tflops": 1.0,
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


def _batch(seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (4, 16), dtype=np.int32)
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
        "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16)),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "loss_mask": jnp.ones((4, 16), jnp.float32),
    }


def test_only_adapters_train_and_hold_optimizer_state():
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1))
    state = init_train_state(TINY, opt, seed=1, lora=LORA)
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), init_params(TINY, 0))
    before = jax.tree.map(np.asarray, base)
    step = jax.jit(build_step(lm_objective(Policy(TINY, LORA)), opt))
    new, metrics = step(state, _batch(), {"base": base})

    adapter_tree = jax.tree.structure(init_adapters(TINY, LORA))
    assert jax.tree.structure(new.params) == adapter_tree
    adam = new.opt_state[1].inner_state[0]  # clip, then AdamW's scale_by_adam
    assert jax.tree.structure(adam.mu) == adapter_tree
    assert jax.tree.structure(adam.nu) == adapter_tree
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    # the base is untouched and stays bf16; every b moved off zero
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(base))
    for module in new.params.values():
        for ab in module.values():
            assert float(jnp.abs(ab["b"]).max()) > 0
    assert float(metrics["loss"]) > 0 and float(metrics["loss_tokens"]) == 64


def test_dropout_applies_to_the_adapter_input_in_training_only():
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapters = jax.tree.map(lambda x: x + 0.1, init_adapters(TINY, lora, 0))  # b non-zero
    params, tokens = init_params(TINY, 0), jnp.asarray([[1, 40, 50, 60, 70, 80]])

    def logits(rng):
        return forward(params, tokens, config=TINY, adapters=adapters_for(adapters, lora, rng))[0]

    plain = forward(params, tokens, config=TINY, adapters=adapters_for(adapters, LORA))[0]
    np.testing.assert_array_equal(np.asarray(logits(None)), np.asarray(plain))  # inference
    one, two = logits(jax.random.key(1)), logits(jax.random.key(2))
    assert float(jnp.abs(one - two).max()) > 1e-3  # a fresh mask per key
    np.testing.assert_array_equal(np.asarray(one), np.asarray(logits(jax.random.key(1))))


def test_adapters_are_placed_by_the_rule_table():
    mesh = make_mesh("fsdp=4,tensor=2", jax.devices())
    opt = make_optimizer(OptimConfig())
    shardings = tree_shardings(abstract_train_state(TINY, opt, LORA), TINY, mesh, "fsdp_tp", LORA)
    attn, ffn = shardings.params["attention"], shardings.params["feed_forward"]
    assert attn["wq"]["a"].spec == PartitionSpec(None, "fsdp")  # [L, embed, rank]
    assert attn["wq"]["b"].spec == PartitionSpec(None, None, "tensor")  # [L, rank, heads, hd]
    assert attn["wo"]["a"].spec == PartitionSpec(None, "tensor")  # [L, heads, hd, rank]
    assert ffn["w2"]["a"].spec == PartitionSpec(None, "tensor")  # [L, mlp, rank]
    assert ffn["w2"]["b"].spec == PartitionSpec(None, None, "fsdp")  # [L, rank, embed]
    mu = shardings.opt_state[1].inner_state[0].mu
    assert mu["attention"]["wq"]["b"].spec == attn["wq"]["b"].spec


def test_resume_is_exact_on_a_tensor_parallel_mesh_with_accumulation(corpus, tmp_path):
    # the schedule's length fixed, so the 3-step run is the first half of the 6-step one
    settings = {
        "mesh": "fsdp=4,tensor=2",
        "rules": "fsdp_tp",
        "grad_accum": 2,
        "optim": {"decay_steps": 6},
    }
    whole = run(
        load_config(None, _settings(corpus, checkpoint_dir=str(tmp_path / "a"), **settings))
    )
    split_dir = str(tmp_path / "b")
    run(load_config(None, _settings(corpus, checkpoint_dir=split_dir, steps=3, **settings)))
    resumed = run(load_config(None, _settings(corpus, checkpoint_dir=split_dir, **settings)))
    assert int(resumed.state.step) == 6
    for a, b in zip(
        jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_lora_run_loads_as_the_merged_model_and_exports_its_adapter(corpus, tmp_path):
    run_dir, adapter = tmp_path / "run", tmp_path / "adapter"
    settings = _settings(corpus, checkpoint_dir=str(run_dir), export_dir=str(adapter), steps=3)
    result = run(load_config(None, settings))
    exported, lora = load_peft(adapter, TINY)
    assert lora == LORA
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    model = load(run_dir)
    base = init_params(TINY, 0)  # the run's base: fresh weights from its seed
    tokens = jnp.asarray([[1, 40, 50, 60, 70]])
    adapted, _ = forward(
        base, tokens, config=TINY, adapters=adapters_for(result.state.params, LORA)
    )
    merged, _ = forward(model.params, tokens, config=model.config)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-5)
    expected = merge(base, result.state.params, LORA)
    np.testing.assert_allclose(
        np.asarray(model.params["layers"]["attention"]["wq"]),
        np.asarray(expected["layers"]["attention"]["wq"]),
        atol=1e-6,
    )


@pytest.mark.slow
def test_lora_lowers_the_loss_as_full_fine_tuning_does(corpus, tmp_path):
    """A base pretrained on the addition corpus, fine-tuned on multiplication facts: 30 LoRA
    steps (rank 8) cut the loss by at least half as much as 30 steps of full fine-tuning."""
    base_dir = tmp_path / "base"
    pre = {"lora": {"rank": 0}, "optim": {"lr": 3e-3, "warmup_steps": 5}}
    run(load_config(None, _settings(corpus, checkpoint_dir=str(base_dir), steps=60, **pre)))
    rng = np.random.default_rng(0)
    task = tmp_path / "multiplication.jsonl"
    pairs = rng.integers(0, 10, (2000, 2))
    task.write_text("".join(json.dumps({"text": f"{a}*{b}={a * b}"}) + "\n" for a, b in pairs))

    def drop(name: str, **overrides) -> float:
        out = tmp_path / name
        cfg = _settings(
            task,
            checkpoint_dir=str(out),
            init_from=str(base_dir),
            steps=30,
            save_every=30,
            log_every=1,
            **overrides,
        )
        run(load_config(None, cfg))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
        return float(np.mean(losses[:3]) - np.mean(losses[-3:]))

    full = drop("full", lora={"rank": 0}, optim={"lr": 3e-3})
    lora = drop("lora", lora={"rank": 8, "alpha": 16.0}, optim={"lr": 1e-2})
    assert full > 1.5
    assert lora > 0.5 * full


def test_a_lora_target_that_does_not_exist_is_one_line(capsys):
    code = train_main(["--config", "tiny-arithmetic", "--lora-rank", "4", "--lora-targets", "q,qq"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["error: --lora-targets: no projection named qq; known: q,k,v,o,gate,up,down"]
