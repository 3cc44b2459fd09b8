"""DPO: preference packing (pairs scored in one forward equal separate forwards), truncation,
precomputed reference log-probs, the losses and gradients against TRL 1.16's `DPOTrainer`, and
a LoRA policy learning a preference rule."""

from __future__ import annotations

import json
from collections import defaultdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import rule_pairs

import llama_jax as lj
from llama_jax.config import ConfigError
from llama_jax.lora import LoraConfig
from llama_jax.model import forward
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import with_rules
from train.data import SKIPPED, DataConfig, DataError
from train.dpo import DPOConfig, completion_logps, dpo_objective, pair_losses, reference_logps
from train.optim import OptimConfig, make_optimizer
from train.preference import (
    fit_lengths,
    make_preference_dataset,
    pair_example,
    per_pair_sums,
    tokenize_pair,
)
from train.step import Policy, build_step, init_train_state
from train.tokenizers import load_tokenizer

CONFIG = lj.preset("tiny")  # 512 ids: the byte tokenizer's vocabulary
BYTES = load_tokenizer("bytes")
RULES = "fsdp_tp"
PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green, surely."},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"messages": [{"role": "user", "content": "hi"}], "chosen": "hello!", "rejected": "go"},
    {
        "prompt": [{"role": "user", "content": "name a fruit"}],
        "chosen": [{"role": "assistant", "content": "apple"}],
        "rejected": [{"role": "assistant", "content": "rock"}],
    },
]


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _batch(path: Path, seq_len: int = 128, batch: int = 2) -> dict[str, jax.Array]:
    cfg = DataConfig(seq_len=seq_len, batch=batch, tokenizer="bytes")
    rows = next(iter(make_preference_dataset([str(path)], BYTES, cfg, seed=0)))
    return {k: jnp.asarray(v) for k, v in rows.items()}


def _perturbed(params, seed: int, scale: float = 0.02):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@partial(jax.jit, static_argnames="loss_chunks")
def _policy_logps(params, batch, loss_chunks: int = 1):
    hidden, _ = forward(
        params, batch["tokens"], batch["positions"], batch["segment_ids"], config=CONFIG,
        hidden_only=True,
    )  # fmt: skip
    return completion_logps(params, hidden, batch, CONFIG, loss_chunks)


def _halves(batch) -> list[tuple[int, int]]:
    """(row, segment) of every half in the batch, chosen before rejected."""
    seg = np.asarray(batch["segment_ids"])
    return [(r, int(s)) for r in range(seg.shape[0]) for s in np.unique(seg[r][seg[r] > 0])]


# --- data ------------------------------------------------------------------------------------


def test_pairs_pack_into_rows_with_own_positions_and_segments(tmp_path):
    batch = _batch(_write(tmp_path / "p.jsonl", PAIRS))
    seg, pair, rej = (np.asarray(batch[k]) for k in ("segment_ids", "pair_ids", "rejected"))
    assert batch["tokens"].shape == (2, 128)
    assert "ref_logps" not in batch
    assert pair.max() > 1  # several pairs share a row
    np.testing.assert_array_equal(seg, np.where(pair > 0, 2 * pair - 1 + rej, 0))
    for r, s in _halves(batch):
        half = seg[r] == s
        np.testing.assert_array_equal(
            np.asarray(batch["positions"])[r][half], np.arange(half.sum())
        )
        assert np.asarray(batch["tokens"])[r][half][0] == BYTES.bos_id
        assert np.asarray(batch["loss_mask"])[r][half][-1] == 1.0  # ends on eot / end_of_text
    texts = {BYTES.decode(np.asarray(batch["targets"])[r][seg[r] == s]) for r, s in _halves(batch)}
    assert "The sky is blue.<|end_of_text|>" in texts
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nhello!<|eot_id|>" in "".join(texts)


def test_packed_pair_logps_equal_separate_forwards(tmp_path):
    params = lj.init_params(CONFIG, 3)
    batch = _batch(_write(tmp_path / "p.jsonl", PAIRS))
    chosen, rejected, valid = per_pair_sums(jnp.zeros(batch["tokens"].shape), batch)
    packed = np.asarray(_policy_logps(params, batch))
    halves = _halves(batch)
    rows = [{k: np.asarray(batch[k])[r][np.asarray(batch["segment_ids"])[r] == s]
             for k in ("tokens", "targets", "loss_mask")} for r, s in halves]  # fmt: skip
    width = max(len(x["tokens"]) for x in rows)
    alone = {k: np.stack([np.pad(x[k], (0, width - len(x[k]))) for x in rows]) for k in rows[0]}
    # one row per sequence, right-padded: causal attention keeps padding out of view
    logits, _ = jax.jit(partial(forward, config=CONFIG))(params, alone["tokens"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), alone["targets"][..., None], -1)
    sums = np.asarray(jnp.sum(logp[..., 0] * alone["loss_mask"], axis=1))
    assert (sums < -1.0).all()
    np.testing.assert_allclose([packed[r, s] for r, s in halves], sums, rtol=1e-5)
    np.testing.assert_allclose(_policy_logps(params, batch, loss_chunks=4), packed, rtol=1e-5)
    assert int(valid.sum()) == len(halves) // 2 >= len(PAIRS)
    assert chosen.shape == rejected.shape == (2, 64)


def test_iterator_resumes_exactly(tmp_path):
    path = _write(tmp_path / "p.jsonl", PAIRS * 3)
    cfg = DataConfig(seq_len=64, batch=2, tokenizer="bytes")
    it = iter(make_preference_dataset([str(path)], BYTES, cfg, seed=3))
    next(it)
    saved = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = iter(make_preference_dataset([str(path)], BYTES, cfg, seed=3))
    again.set_state(saved)
    for want in expected:
        got = next(again)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_truncation_keeps_the_prompt_and_cuts_completions():
    assert fit_lengths(10, 5, 5, 64) == (10, 5, 5)  # fits: 14 + 14 positions
    assert fit_lengths(10, 40, 8, 64) == (10, 38, 8)  # the longer completion is cut first
    assert fit_lengths(10, 40, 30, 64) == (10, 23, 23)  # both cut to an equal share
    assert fit_lengths(40, 3, 3, 64) == (32, 1, 1)  # no room: the prompt loses its beginning
    pair = tokenize_pair({"prompt": "abc", "chosen": "x" * 50, "rejected": "yy"}, BYTES)
    example = pair_example(pair, 32)
    assert len(example["tokens"]) == 32 and example["truncated"][0] == 1  # 4 + 26 - 1, 4 + 3 - 1
    halves = np.split(example["targets"], [np.argmax(example["rejected"])])
    assert BYTES.decode(halves[0]) == "abc" + "x" * 23  # cut from the end, no end_of_text
    assert BYTES.decode(halves[1]) == "abcyy<|end_of_text|>"
    assert pair_example(tokenize_pair(PAIRS[1], BYTES), 32)["truncated"].sum() == 0


def test_missing_chosen_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "x", "rejected": "y"}])
    cfg = DataConfig(seq_len=64, batch=1, tokenizer="bytes")
    it = iter(make_preference_dataset([str(path)], BYTES, cfg, seed=0))
    with pytest.raises(DataError, match=rf"^{path}:2: no 'chosen' key"):
        for _ in range(4):
            next(it)
    no_prompt = _write(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=rf"^{no_prompt}:1: no 'prompt' \(or 'messages'\)"):
        make_preference_dataset([str(no_prompt)], BYTES, cfg, seed=0)


def test_bad_data_skip_passes_over_bad_pairs_and_counts_them(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "x", "rejected": "y"}, PAIRS[1]])
    with path.open("a") as f:
        f.write("{not json\n")
    cfg = DataConfig(seq_len=64, batch=1, tokenizer="bytes", bad_data="skip")
    before = SKIPPED.count
    it = iter(make_preference_dataset([str(path)], BYTES, cfg, seed=0))
    rows = [next(it) for _ in range(6)]
    assert SKIPPED.count - before >= 2  # both bad lines met at least once
    assert all(int(r["pair_ids"].max()) >= 1 for r in rows)  # every row holds good pairs


def test_precomputed_reference_matches_the_frozen_copy(tmp_path):
    ref = lj.init_params(CONFIG, 5)
    out = reference_logps(
        ref, CONFIG, [str(_write(tmp_path / "p.jsonl", PAIRS))], tmp_path / "ref.jsonl",
        BYTES, seq_len=128, batch=3,
    )  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in x.items() if not k.startswith("ref_")} for x in lines] == PAIRS
    batch = _batch(out)
    chosen, rejected, valid = per_pair_sums(batch["ref_logps"], batch)
    got = {(round(float(c), 4), round(float(r), 4)) for c, r in zip(
        chosen[valid > 0], rejected[valid > 0], strict=True)}  # fmt: skip
    stored = {(round(x["ref_chosen_logps"], 4), round(x["ref_rejected_logps"], 4)) for x in lines}
    assert got <= stored and len(got) == len(stored)  # all four pairs fit in the two rows
    policy = Policy(CONFIG)
    params = _perturbed(ref, 1)
    rng = jax.random.key(0)
    for loss in ("sigmoid", "ipo"):
        pre = jax.jit(dpo_objective(policy, DPOConfig(loss=loss, reference="precomputed")))
        full = jax.jit(dpo_objective(policy, DPOConfig(loss=loss)))
        a, b = pre(params, {}, batch, rng), full(params, {"reference": ref}, batch, rng)
        np.testing.assert_allclose(a.loss_sum, b.loss_sum, rtol=1e-5)
        np.testing.assert_allclose(
            a.means["rewards/margins"], b.means["rewards/margins"], rtol=1e-4
        )
    without = {k: v for k, v in batch.items() if k != "ref_logps"}
    with pytest.raises(ConfigError, match="write them with --precompute-reference first"):
        jax.eval_shape(pre, params, {}, without, rng)


def test_losses_follow_the_formulas():
    c, r = (jnp.asarray([-3.0, -5.0]), jnp.asarray([-4.0, -2.0]))
    rc, rr = (jnp.asarray([-3.5, -4.0]), jnp.asarray([-3.0, -2.5]))
    n = (jnp.asarray([2.0, 3.0]), jnp.asarray([4.0, 1.0]))
    z = 0.1 * ((c - rc) - (r - rr))
    logsig = jax.nn.log_sigmoid
    cdpo = pair_losses(DPOConfig(label_smoothing=0.2), (c, r), (rc, rr), n)
    np.testing.assert_allclose(cdpo, -0.8 * logsig(z) - 0.2 * logsig(-z), rtol=1e-6)
    ipo = pair_losses(DPOConfig(loss="ipo", beta=0.5), (c, r), (rc, rr), n)
    np.testing.assert_allclose(ipo, ((c - rc) / n[0] - (r - rr) / n[1] - 1.0) ** 2, rtol=1e-6)
    for bad, match in (
        ({"loss": "kto"}, "--dpo-loss 'kto'"),
        ({"beta": 0.0}, "--dpo-beta 0.0"),
        ({"label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"reference": "base"}, "--dpo-reference 'base'"),
    ):
        with pytest.raises(ValueError, match=match):
            DPOConfig(**bad)


def test_sharded_accumulated_step_equals_one_device(tmp_path):
    """Pairs never straddle rows, so splitting rows over devices and micro-batches, and the
    sequence over devices, changes nothing but rounding."""
    params, ref = lj.init_params(CONFIG, 2), lj.init_params(CONFIG, 4)
    batch = jax.device_get(_batch(_write(tmp_path / "p.jsonl", PAIRS * 2), 64, 4))
    objective = dpo_objective(Policy(CONFIG), DPOConfig(loss="ipo"))
    # eps 1: Adam's first update is about -g / (|g| + 1), smooth in g, unlike the usual -sign(g)
    optimizer = make_optimizer(OptimConfig(lr=1.0, warmup_steps=1, eps=1.0, weight_decay=0.0))

    def run(spec: str, devices, grad_accum: int):
        mesh = make_mesh(spec, devices)
        state = init_train_state(CONFIG, optimizer, params=place.place(params, CONFIG, mesh, RULES))
        step = build_step(objective, optimizer, grad_accum=grad_accum)
        frozen = {"reference": place.place(ref, CONFIG, mesh, RULES)}
        placed = place.place_batch(batch, mesh, RULES)
        return jax.device_get(jax.jit(with_rules(step, mesh, RULES))(state, placed, frozen))

    (one, m1), (many, m8) = (
        run("1", jax.devices()[:1], 1),
        run("data=2,sequence=2,tensor=2", None, 2),
    )
    assert m1["pairs"] == m8["pairs"] >= 4
    for key in ("loss", "grad_norm", "rewards/margins"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), one.params, params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # the step changed every tensor
    for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- against TRL -----------------------------------------------------------------------------


def _trl_inputs(batch) -> dict:
    """The batch's pairs as TRL's collator lays them out: chosen rows, then rejected rows,
    right-padded; `completion_mask` marks completion ids."""
    torch = pytest.importorskip("torch")
    seqs, masks = [], []
    for r, s in _halves(batch):
        half = np.asarray(batch["segment_ids"])[r] == s
        targets = np.asarray(batch["targets"])[r][half]
        seqs.append([int(np.asarray(batch["tokens"])[r][half][0]), *targets])
        masks.append([0, *np.asarray(batch["loss_mask"])[r][half].astype(int)])
    order = [*range(0, len(seqs), 2), *range(1, len(seqs), 2)]
    width = max(map(len, seqs))

    def padded(rows, dtype):
        return torch.tensor([[*rows[i], *[0] * (width - len(rows[i]))] for i in order], dtype=dtype)

    ids, completion = padded(seqs, torch.int64), padded(masks, torch.int64)
    return {
        "input_ids": ids,
        "attention_mask": padded([[1] * len(x) for x in seqs], torch.int64),
        "completion_mask": completion,
    }


def _trl_trainer(policy, reference, loss: str, beta: float, label_smoothing: float):
    """The attributes `DPOTrainer._compute_loss` reads, single process, no PEFT."""
    identity = lambda x: x  # noqa: E731
    accelerator = SimpleNamespace(
        device="cpu", gather_for_metrics=identity, gather=identity, unwrap_model=identity
    )
    return SimpleNamespace(
        model=policy, ref_model=reference, accelerator=accelerator, beta=beta,
        label_smoothing=label_smoothing, loss_types=[loss], loss_weights=[1.0],
        f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=False,
        use_weighting=False, aux_loss_enabled=False, args=SimpleNamespace(
            gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0)])
def test_loss_and_gradient_match_trl(tmp_path, loss, smoothing):
    pytest.importorskip("trl")
    hf_oracle = pytest.importorskip("hf_oracle")
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from llama_jax.checkpoint.layout import params_getter, torch_tensors

    params = lj.init_params(CONFIG, 7)
    ref = _perturbed(params, 11)
    batch = _batch(_write(tmp_path / "p.jsonl", PAIRS))
    cfg = DPOConfig(beta=0.5, loss=loss, label_smoothing=smoothing)
    objective = dpo_objective(Policy(CONFIG), cfg)

    def mean_loss(p):
        parts = objective(p, {"reference": ref}, batch, jax.random.key(0))
        return parts.loss_sum / parts.count, parts

    (ours, parts), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)

    policy_hf = hf_oracle.hf_model_from_params(CONFIG, params)
    ref_hf = hf_oracle.hf_model_from_params(CONFIG, ref)
    add_fused_lm_head(policy_hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(ref_hf)
    trainer = _trl_trainer(policy_hf, ref_hf, loss, cfg.beta, smoothing)
    theirs = DPOTrainer._compute_loss(trainer, policy_hf, _trl_inputs(batch), False)
    theirs.backward()

    assert abs(float(theirs.detach())) > 1e-2
    np.testing.assert_allclose(float(ours), float(theirs.detach()), rtol=1e-5)
    logged = trainer._metrics["eval"]
    for key in ("rewards/chosen", "rewards/margins", "logps/rejected"):
        np.testing.assert_allclose(parts.means[key] / parts.count, logged[key][0], rtol=1e-4)
    ours_hf = {name: x for name, _, x in torch_tensors(CONFIG, params_getter(grads), "hf")}
    hf_grads = {name: p.grad.numpy() for name, p in policy_hf.named_parameters()}
    for name in (
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ):  # fmt: skip
        scale = np.abs(hf_grads[name]).max()
        assert scale > 0
        assert np.abs(ours_hf[name] - hf_grads[name]).max() <= 1e-5 * scale, name


# --- training --------------------------------------------------------------------------------


def test_lora_dpo_learns_the_preferred_rule(tmp_path):
    lora = LoraConfig(rank=8, alpha=16)
    policy = Policy(CONFIG, lora)
    frozen = {"base": lj.init_params(CONFIG, 0)}
    objective = dpo_objective(policy, DPOConfig(beta=0.5))
    optimizer = make_optimizer(OptimConfig(lr=5e-3, warmup_steps=5, weight_decay=0.0))
    state = init_train_state(CONFIG, optimizer, 0, lora=lora)
    step = jax.jit(build_step(objective, optimizer))
    cfg = DataConfig(seq_len=64, batch=8, tokenizer="bytes")
    train = iter(
        make_preference_dataset(
            [str(_write(tmp_path / "train.jsonl", rule_pairs(512, 0)))], BYTES, cfg, seed=0
        )
    )
    held_out = _batch(_write(tmp_path / "test.jsonl", rule_pairs(64, 1)), 64, 8)  # fmt: skip

    def evaluate(adapters) -> tuple[float, float]:
        parts = jax.jit(objective)(adapters, frozen, held_out, None)
        n = float(parts.count)
        return float(parts.means["rewards/accuracies"]) / n, float(
            parts.means["rewards/margins"]
        ) / n

    assert evaluate(state.params) == (0.0, 0.0)  # adapters start at zero: policy = reference
    for _ in range(150):
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in next(train).items()}, frozen)
    accuracy, margin = evaluate(state.params)
    assert accuracy > 0.9 and margin > 1.0, (accuracy, margin)
    assert float(metrics["rewards/accuracies"]) > 0.9 and float(metrics["pairs"]) > 8
