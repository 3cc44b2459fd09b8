"""`python -m llama_jax.infer` on stories260K: the known greedy output, batch files, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infer.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stories(shared_assets) -> Path:
    return shared_assets / "stories260K"


def test_stories260k_reproduces_its_known_output(stories):
    expected = json.loads((stories / "expected" / "greedy_from_bos.json").read_text())
    cmd = [sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(stories / "hf"),
           "--prompt-ids", "1", "--max-new-tokens", "256", "--json"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    result = json.loads(line)
    assert result["prompt_ids"] == [1]
    assert result["generated_ids"] == expected["tokens"][1:]
    assert result["finish_reason"] == "length"
    assert result["text"] is None and "no tokenizer" in result["note"]
    assert set(result["timings"]) >= {"time_to_first_token_s", "decode_tokens_per_s"}


def test_kv_cache_layouts_give_the_same_greedy_tokens(stories, capsys, tmp_path):
    """The KV flags change where the cache lives, never what greedy decoding produces: the
    contiguous layout, and small blocks in a pool too small for all three at once (so some
    are preempted and recomputed) without the prefix cache."""
    rows = [{"prompt_ids": [1]}, {"prompt_ids": [1, 403, 407]}, {"prompt_ids": [1, 88, 9]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--checkpoint", stories / "hf", "--file", path, "--max-new-tokens", 12, "--json",
              "--max-seq-len", 64]  # fmt: skip
    outputs = []
    for flags in ([], ["--kv-layout", "contiguous"],
                  ["--block-size", 4, "--kv-blocks", 8, "--no-prefix-cache"]):  # fmt: skip
        code, out, err = run(capsys, *common, *flags)
        assert code == 0, err
        outputs.append([json.loads(line)["generated_ids"] for line in out.splitlines()])
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert all(len(ids) == 12 for ids in outputs[0])


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_file_batch_mode_matches_single_prompts(stories, capsys, tmp_path):
    rows = [{"prompt_ids": [1]}, {"prompt_ids": [1, 403, 407], "max_new_tokens": 5},
            {"prompt_ids": [1, 88, 9], "temperature": 0.8, "seed": 3}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = stories / "hf"
    # One slot: the three queue through it (and share compiled code with the runs below).
    code, out, err = run(capsys, "--checkpoint", ckpt, "--file", path, "--max-new-tokens", 12,
                         "--json", "--max-seq-len", 64, "--max-batch", 1)  # fmt: skip
    assert code == 0, err
    batch = [json.loads(line) for line in out.splitlines()]
    assert [len(r["generated_ids"]) for r in batch] == [12, 5, 12]
    code, out, err = run(capsys, "--checkpoint", ckpt, "--prompt-ids", "1,88,9",
                         "--max-new-tokens", 12, "--temperature", 0.8, "--seed", 3, "--json",
                         "--max-seq-len", 64)  # fmt: skip
    assert json.loads(out)["generated_ids"] == batch[2]["generated_ids"]
    code, out, err = run(capsys, "--checkpoint", ckpt, "--prompt-ids", 1, "--max-new-tokens", 12)
    assert out.split() == [str(t) for t in batch[0]["generated_ids"]]  # ids when no tokenizer


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "Once"], "--prompt needs a tokenizer"),
        (["--prompt-ids", "1", "--temperature", "-1"], "--temperature must be a number >= 0"),
        (["--prompt-ids", "1", "--top-p", "2"], "--top-p must be a number in (0, 1]"),
        (["--prompt-ids", ",".join(["1"] * 600)], "--prompt-ids: prompt has 600 tokens, but the context (--max-seq-len) is 512"),
        (["--prompt-ids", "1", "--max-seq-len", "0"], "argument --max-seq-len: expected an integer >= 1"),
        (["--prompt-ids", "1,x"], "argument --prompt-ids: expected comma-separated token ids"),
        (["--prompt-ids", "1", "--top-k", "many"], "argument --top-k: invalid int value"),
        (["--chat"], "--chat needs a tokenizer"),
        (["--prompt-ids", "1", "--stop", "The"], "stop strings need a tokenizer"),
        (["--prompt-ids", "1", "--kv-layout", "contiguous", "--kv-blocks", "4"], "--kv-layout contiguous sets the block size and the pool itself"),
        (["--prompt-ids", "1", "--kv-layout", "ring"], "argument --kv-layout: invalid choice"),
    ],
)  # fmt: skip
def test_errors_are_one_line(stories, capsys, args, message):
    try:
        code, _, err = run(capsys, "--checkpoint", stories / "hf", *args)
    except SystemExit as e:  # argparse
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    assert err.startswith("llama_jax.infer: error: ") and err.count("\n") == 1
    assert message in err


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "--checkpoint", tmp_path / "nope", "--prompt-ids", "1")
    assert code == 2 and err.count("\n") == 1 and "nope" in err
