"""The lm-eval backend ("llama-jax") and the perplexity CLI against transformers oracles.

Oracles: lm-eval's own Hugging Face backend ("hf") on the same weights and tokenizer (a tiny
random Llama with Meta's Llama 3 tokenizer, written as an HF repo), and `transformers`
computations of the rolling-window and sliding-window log-likelihoods on stories260K (a real
trained model). The task is a local multiple-choice JSONL: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llama3_assets import meta_tokenizer_path

from llama_jax.tokenizer import SPECIAL_TOKEN_NAMES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
evaluator = pytest.importorskip("lm_eval.evaluator")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from infer import lm_eval_backend  # noqa: E402  (needs lm_eval)
from infer.scoring import stride_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "llama_jax_tiny_mc"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud", "square"], 0),
    ("Two plus two equals", ["three", "four", "five", "seven"], 1),
    ("Ice is made of frozen", ["fire", "sand", "water", "wood"], 2),
    ("A cat says", ["meow", "moo", "quack", "oink"], 0),
    ("The opposite of hot is", ["warm", "red", "tall", "cold"], 3),
    ("Paris is the capital of", ["Spain", "France", "Peru", "Japan"], 1),
]
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree. She ran to the ball "
    "and kicked it very high. The ball flew over the fence and into the pond. Lily was sad, but "
    "her mom helped her get it back. They laughed and went home to eat a yummy cake together."
)


@pytest.fixture(scope="module")
def llama3_repo(tmp_path_factory) -> Path:
    """A tiny random Llama (float32) with Meta's Llama 3 tokenizer as an HF repo: safetensors
    and a tokenizer.json that adds BOS, as Meta's HF releases do."""
    from tokenizers.processors import TemplateProcessing
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = meta_tokenizer_path()
    if model_file is None:
        pytest.skip("Meta's Llama 3 tokenizer.model not found")
    root = tmp_path_factory.mktemp("llama3_tiny")
    converted = TikTokenConverter(
        vocab_file=str(model_file), extra_special_tokens=SPECIAL_TOKEN_NAMES
    ).converted()
    bos = "<|begin_of_text|>"
    converted.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 128000)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=converted, bos_token=bos, eos_token="<|end_of_text|>"
    )
    tok.save_pretrained(root)
    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        initializer_range=0.3,  # peaked distributions: no near-ties between the choices
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)  # weights that get one question of six right: acc is not just 0
    transformers.LlamaForCausalLM(config).float().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    data = root / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    return root


@pytest.fixture(scope="module")
def stories(shared_assets) -> tuple[Path, Path]:
    root = shared_assets / "stories260K"
    return root / "hf", root / "tok512.model"


def _evaluate(model: str, model_args: str, task_dir: Path) -> dict:
    return evaluator.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )


@pytest.mark.slow
def test_multiple_choice_matches_hf_backend(llama3_repo, task_dir):
    ours = _evaluate(
        "llama-jax", f"checkpoint={llama3_repo},mesh=data=-1+tensor=2,max_length=64", task_dir
    )
    hf = _evaluate("hf", f"pretrained={llama3_repo},dtype=float32", task_dir)
    by_doc = {s["doc_id"]: s["filtered_resps"] for s in hf["samples"][TASK]}
    assert len(by_doc) == len(QUESTIONS)
    for sample in ours["samples"][TASK]:
        theirs = by_doc[sample["doc_id"]]
        np.testing.assert_allclose(
            [float(ll) for ll, _ in sample["filtered_resps"]],
            [float(ll) for ll, _ in theirs],
            atol=1e-3,
            rtol=0,
        )
        assert [g for _, g in sample["filtered_resps"]] == [g for _, g in theirs]
    assert ours["results"][TASK]["acc,none"] == hf["results"][TASK]["acc,none"]


@pytest.fixture(scope="module")
def ours_llama3(llama3_repo):
    return lm_eval_backend.LlamaJaxLM(checkpoint=str(llama3_repo), batch_size=4)


@pytest.fixture(scope="module")
def hf_llama3(llama3_repo):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(llama3_repo), dtype="float32", batch_size=4, device="cpu")


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.slow
def test_tokenization_and_empty_context_match_hf_backend(ours_llama3, hf_llama3):
    """Contexts with trailing spaces, an empty context (BOS alone) and special-token text."""
    pairs = [
        ("Hello there ", "general"),
        ("", "Kenobi"),
        ("<|eot_id|>Hi", " you"),
        ("12345", "6789"),
    ]
    for ctx, cont in pairs:
        assert ours_llama3.tok_encode(ctx + cont) == hf_llama3.tok_encode(ctx + cont)
    reqs = _requests("loglikelihood", pairs)
    ours, theirs = ours_llama3.loglikelihood(reqs), hf_llama3.loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], atol=1e-3, rtol=0)
    assert [g for _, g in ours] == [g for _, g in theirs]


@pytest.mark.slow
def test_greedy_generation_matches_hf_backend(ours_llama3, hf_llama3):
    reqs = _requests(
        "generate_until",
        [
            ("The meaning of life is", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
            ("Once", {"until": ["."], "max_gen_toks": 6, "temperature": 0.0}),
        ],
    )
    ours = ours_llama3.generate_until(reqs)
    assert ours == hf_llama3.generate_until(reqs)
    assert all(ours)


def _hf_stories(hf_dir: Path):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _sum_logprob(model, inputs: list[int], targets: list[int], scored: int) -> float:
    """Sum of log p(target) over the last `scored` positions of one forward."""
    with torch.no_grad():
        logits = model(torch.tensor([inputs])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)]
    return float(logp[-scored:].sum())


@pytest.mark.slow
def test_loglikelihood_rolling_equals_transformers(stories):
    hf_dir, tokenizer = stories
    lm = lm_eval_backend.LlamaJaxLM(
        checkpoint=str(hf_dir), tokenizer=str(tokenizer), max_length=32, batch_size=3
    )
    assert lm.tok_encode(STORY)[0] == lm.prefix_token_id  # contexts get BOS (SentencePiece too)
    ids = [lm.prefix_token_id, *lm.tok_encode(STORY, add_special_tokens=False)]
    assert len(ids) > 3 * 32  # several windows
    (total,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(STORY,)]))
    hf = _hf_stories(hf_dir)
    # lm-eval's rolling windows: each predicts the next (up to) 32 tokens from the 32 tokens
    # before its last one (the last window's context reaches back over scored tokens).
    expected, done = 0.0, 0
    while done < len(ids) - 1:
        end = min(done + 32, len(ids) - 1)
        start = max(0, end - 32)
        expected += _sum_logprob(hf, ids[start:end], ids[start + 1 : end + 1], end - done)
        done = end
    assert abs(total - expected) <= 1e-4 * abs(expected)


def test_stride_windows_cover_each_token_once():
    ids = list(range(23))
    windows = stride_windows(ids, max_length=8, stride=3)
    scored = [t for _, cont in windows for t in cont]
    assert scored == ids[1:]
    assert all(len(ctx) >= 1 and len(ctx) + len(cont) <= 8 for ctx, cont in windows)
    with pytest.raises(ValueError, match="stride"):
        stride_windows(ids, max_length=8, stride=9)


def _run_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llama_jax.eval", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_perplexity_cli_equals_transformers_sliding_window(stories, tmp_path):
    hf_dir, tokenizer = stories
    data = tmp_path / "docs.jsonl"
    docs = [STORY, STORY[:150]]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = _run_eval(
        "perplexity",
        *("--checkpoint", str(hf_dir), "--tokenizer", str(tokenizer), "--data", str(data)),
        *("--max-length", "32", "--stride", "12", "--batch", "4", "--mesh", "data=-1"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])

    # Hugging Face's perplexity recipe, token-exact: each window's labels are its tokens past
    # the previous window's end (the rest -100), summed over the labels the shift keeps.
    from llama_jax.tokenizer import open_tokenizer

    tok, hf = open_tokenizer(tokenizer), _hf_stories(hf_dir)
    nll, count = 0.0, 0
    for doc in docs:
        ids = tok.encode(doc, bos=True)
        prev_end = 0
        for begin in range(0, len(ids), 12):
            end = min(begin + 32, len(ids))
            window = ids[begin:end]
            labels = [-100] * (len(window) - (end - prev_end)) + window[-(end - prev_end) :]
            keep = [i for i in range(1, len(window)) if labels[i] != -100]
            nll -= _sum_logprob(hf, window[:-1], window[1:], len(keep))
            count += len(keep)
            prev_end = end
            if end == len(ids):
                break
    assert result["tokens"] == count
    assert abs(result["nll"] - nll / count) <= 1e-5 * nll / count
    assert math.isclose(result["perplexity"], math.exp(nll / count), rel_tol=1e-5)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "a"}\nnot json\n', ":2: not JSON (Expecting value)"),
        ('{"txt": "a"}\n', ':1: expected an object with a "text" string'),
        ("\n\n", ": no text"),
    ],
)
def test_perplexity_cli_bad_data_is_one_line(tmp_path, capsys, content, expected):
    from infer.perplexity import main

    data = tmp_path / "docs.jsonl"
    data.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path), "--data", str(data)])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"llama_jax.eval perplexity: error: --data {data}{expected}"]


def test_start_up_hook_registers_llama_jax_beside_lm_evals_models():
    """The installed `llama_jax_lm_eval.pth` (infer/lm_eval_hook.py) registers "llama-jax" in a
    fresh interpreter without hiding lm-eval's own table, which it fills only while empty
    (the slow CLI test below loads the model through it)."""
    code = (
        "from lm_eval.api.registry import get_model, model_registry; "
        "print(get_model('hf').__name__, 'llama-jax' in model_registry)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["HFLM", "True"], out.stderr[-2000:]


@pytest.mark.slow
def test_lm_eval_cli_runs_llama_jax_model(llama3_repo, task_dir, tmp_path):
    """lm-eval's own `lm_eval` command finds "llama-jax" (see the test below)."""
    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = subprocess.run(
        [str(lm_eval), "--model", "llama-jax",
         "--model_args", f"checkpoint={llama3_repo},max_length=64",
         "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "4",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert TASK in out.stdout and "acc" in out.stdout
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert TASK in json.loads(results.read_text())["results"]
