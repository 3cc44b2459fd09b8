"""`python -m llama_jax.post rejection-sample`: the rows written are what the reward selects
from the samples (recomputed here by generating each prompt alone), the summary's numbers are
those of the samples, and `python -m llama_jax.train --sft` reads the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_layering import loaded_packages

import llama_jax
from infer.sampling import choice_seed
from llama_jax.post import main
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train import main as train_main
from train import corpus
from train.prompts import read_prompts
from train.rejection import summary_path

N = 4
SEED = 5
NEW_TOKENS = 64  # long enough that some samples stop (3 stop ids of 512) and some do not
PROMPTS = [
    {"prompt": "3+4="},
    {"messages": [{"role": "user", "content": "say hi"}]},
    {"prompt": "9-2=", "answer": "7"},
]


def id_sum(samples) -> list[float]:
    """A reward that varies on a random model, with ties: the completion ids' sum mod 4, / 3."""
    return [sum(s.completion_ids) % 4 / 3 for s in samples]


REWARD = f"python:{__name__}:id_sum"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = llama_jax.init(llama_jax.preset("tiny", max_seq_len=128), seed=1)
    return llama_jax.export(model, tmp_path_factory.mktemp("ckpt") / "tiny", "orbax")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def samples(checkpoint, prompts) -> list[tuple[list[float], list[bool], list[str]]]:
    """(rewards, ended by length, texts) of each prompt's samples, each prompt generated alone
    with the seed the CLI gives it: `choice_seed(SEED, k * N)` for prompt k."""
    model = llama_jax.load(checkpoint)
    model.tokenizer = ByteTokenizer()
    out = []
    for k, row in enumerate(read_prompts(str(prompts), model.tokenizer)):
        seed = choice_seed(SEED, k * N)
        group = model.generate(
            list(row.ids), n=N, seed=seed, temperature=1.0, max_new_tokens=NEW_TOKENS
        )
        ids = [c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids for c in group]
        out.append(
            (
                [sum(i) % 4 / 3 for i in ids],
                [c.finish_reason == "length" for c in group],
                [c.text for c in group],
            )
        )
    return out


def sample(checkpoint, prompts, out: Path, *flags: str) -> tuple[list[dict], dict]:
    argv = [
        "rejection-sample",
        "--checkpoint",
        str(checkpoint),
        "--tokenizer",
        "bytes",
        "--prompts",
        str(prompts),
        "--n",
        str(N),
        "--reward",
        REWARD,
        "--out",
        str(out),
        "--seed",
        str(SEED),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--max-batch",
        "4",  # 4 slots: batches of 4 prompts (4 waves of the slots), so all 3 in one
        *flags,
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads(summary_path(out).read_text())


def sft_row(k: int, text: str) -> dict:
    spec = PROMPTS[k]
    if "prompt" in spec:
        return {"prompt": spec["prompt"], "completion": text}
    return {"messages": [*spec["messages"], {"role": "assistant", "content": text}]}


def expected(samples, keep_truncated: bool, threshold=None, min_reward=None) -> list[dict]:
    rows = []
    for k, (rewards, ended, texts) in enumerate(samples):
        candidates = [i for i in range(N) if keep_truncated or not ended[i]]
        if not candidates:
            continue
        best = max(candidates, key=lambda i: (rewards[i], -i))  # ties: the first
        if min_reward is not None and rewards[best] < min_reward:
            continue
        kept = [best] if threshold is None else [i for i in candidates if rewards[i] >= threshold]
        rows += [sft_row(k, texts[i]) for i in kept]
    return rows


def test_the_best_of_each_prompt_is_kept_and_the_summary_is_right(
    checkpoint, prompts, samples, tmp_path, capsys
):
    rows, summary = sample(checkpoint, prompts, tmp_path / "best.jsonl", "--keep-truncated")
    assert rows == expected(samples, keep_truncated=True)
    rewards = np.float32([r for group, _, _ in samples for r in group])
    assert len({tuple(group) for group, _, _ in samples}) > 1  # the prompts drew differently
    want = {
        "prompts": 3,
        "samples": 3 * N,
        "kept": 3,
        "truncated": sum(sum(ended) for _, ended, _ in samples),
        "best_reward_mean": pytest.approx(np.mean([max(g) for g, _, _ in samples])),
        "pass_at_n": pytest.approx(np.mean([max(g) > 0 for g, _, _ in samples])),
    }
    assert {k: summary[k] for k in want} == want
    r = summary["reward"]
    assert (r["mean"], r["std"], r["min"], r["max"]) == pytest.approx(
        (rewards.mean(), rewards.std(), rewards.min(), rewards.max())
    )
    assert r["quantiles"]["p50"] == pytest.approx(np.median(rewards))
    assert summary["generated_tokens"] > 0 and summary["tokens_per_s"] > 0
    err = capsys.readouterr().err
    assert "rejection-sample: 3/3 prompts" in err and "3 kept" in err


@pytest.mark.slow  # compiles the engine for 2 slots
def test_the_batching_changes_nothing(checkpoint, prompts, tmp_path):
    """Batches of 2 prompts (`--max-batch 2`: 4 waves of 2 slots) write what one batch does."""
    one, _ = sample(checkpoint, prompts, tmp_path / "a.jsonl", "--keep-truncated")
    two, _ = sample(
        checkpoint, prompts, tmp_path / "b.jsonl", "--keep-truncated", "--max-batch", "2"
    )
    assert one == two


def test_truncated_completions_are_dropped_by_default(checkpoint, prompts, samples, tmp_path):
    rows, summary = sample(checkpoint, prompts, tmp_path / "cut.jsonl")
    assert 0 < summary["truncated"] < 3 * N - 1  # some prompt has a sample that stopped
    assert rows == expected(samples, keep_truncated=False)
    assert summary["kept"] == len(rows) > 0


def test_threshold_keeps_every_completion_at_or_above_it(checkpoint, prompts, samples, tmp_path):
    flags = ["--keep-truncated", "--threshold", "0.5"]
    rows, summary = sample(checkpoint, prompts, tmp_path / "t.jsonl", *flags)
    assert rows == expected(samples, keep_truncated=True, threshold=0.5)
    assert summary["kept"] == sum(r >= 0.5 for g, _, _ in samples for r in g) > 3


def test_min_reward_drops_prompts_whose_best_is_below_it(checkpoint, prompts, samples, tmp_path):
    flags = ["--keep-truncated", "--min-reward", "1"]
    rows, _ = sample(checkpoint, prompts, tmp_path / "m.jsonl", *flags)
    assert rows == expected(samples, keep_truncated=True, min_reward=1.0)
    assert len(rows) < 3 or all(max(g) == 1 for g, _, _ in samples)


def test_user_errors_are_one_line(checkpoint, prompts, tmp_path, capsys):
    base = ["rejection-sample", "--checkpoint", str(checkpoint), "--tokenizer", "bytes"]
    out = ["--out", str(tmp_path / "x.jsonl")]
    missing = tmp_path / "nope.jsonl"
    assert main([*base, "--prompts", str(missing), "--reward", "exact", *out]) == 1
    assert capsys.readouterr().err == f"error: --prompts {missing}: no such file\n"
    assert main([*base, "--prompts", str(prompts), "--reward", "bogus", *out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --reward 'bogus': expected one of") and err.count("\n") == 1
    assert main([*base, "--prompts", str(prompts), "--reward", "exact", "--top-p", "0", *out]) == 1
    assert capsys.readouterr().err.startswith("error: --top-p must be")
    assert not (tmp_path / "x.jsonl").exists()


def test_the_module_does_not_load_infer():
    assert "infer" not in loaded_packages("train.rejection")


def tiny_run(tmp_path: Path, name: str, *flags: str, **settings) -> Path:
    """`python -m llama_jax.train` of the tiny model (byte tokenizer) in-process; its run dir."""
    config = tmp_path / f"{name}.yaml"
    base = {
        "model": "tiny",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"seq_len": 64, "batch": 8, "tokenizer": "bytes"},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "steps": 2,
        "mesh": "fsdp=-1",
        "log_every": 1,
        "peak_tflops": 1.0,
    }
    config.write_text(yaml.safe_dump({**base, **settings}))
    run_dir = tmp_path / name
    assert train_main(["--config", str(config), "--checkpoint-dir", str(run_dir), *flags]) == 0
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_sft_on_the_output_trains_on_the_completions(checkpoint, prompts, tmp_path):
    rows, _ = sample(checkpoint, prompts, tmp_path / "sft.jsonl", "--keep-truncated")
    assert {"prompt", "completion"} <= rows[0].keys() and "messages" in rows[1]
    run_dir = tiny_run(tmp_path, "sft", "--sft", "--data", str(tmp_path / "sft.jsonl"))
    assert len(losses(run_dir)) == 2 and all(np.isfinite(losses(run_dir)))


@pytest.mark.slow
def test_a_model_trained_on_arithmetic_keeps_right_answers_and_learns_from_them(tmp_path):
    """40 steps on the built-in corpus, then the best of 4 samples of each held-out sum, kept
    only when right, is SFT data for the model."""
    policy = tiny_run(
        tmp_path,
        "policy",
        steps=40,
        optim={"lr": 3e-3, "warmup_steps": 5},
        data={"paths": ["builtin:arithmetic"], "seq_len": 64, "batch": 8, "tokenizer": "bytes"},
    )
    out = tmp_path / "right.jsonl"
    argv = ["rejection-sample", "--checkpoint", str(policy), "--tokenizer", "bytes"]
    argv += ["--prompts", "builtin:arithmetic:heldout", "--reward", "arithmetic", "--n", "4"]
    argv += ["--out", str(out), "--seed", "0", "--max-new-tokens", "4", "--min-reward", "1"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(summary_path(out).read_text())
    assert summary["prompts"] == len(corpus.split("heldout"))
    assert summary["samples"] == 4 * summary["prompts"]
    assert 0 < len(rows) <= summary["pass_at_n"] * summary["prompts"]
    assert corpus.score({r["prompt"]: r["completion"] for r in rows}) == (len(rows), len(rows))
    sft = tiny_run(tmp_path, "sft", "--sft", "--data", str(out), "--init-from", str(policy))
    assert all(np.isfinite(losses(sft)))
