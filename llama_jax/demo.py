"""`make demo`: pretrain a tiny Llama 3 on the built-in arithmetic corpus, then ask it sums.

Runs on an emulated 8-device CPU mesh (fsdp=8), so the sharded training path is the one a TPU
pod runs. Steps:
  1. train `configs/demo.yaml` (a 4-layer Llama 3 with Meta's 128256-token vocabulary) for a
     few minutes on `builtin:arithmetic` facts like `7+8=15`, checkpointing into a run directory;
  2. run `python -m llama_jax.infer --checkpoint RUN_DIR` greedily on every fact's prompt;
  3. print how many answers are right (an untrained model gets about 1 in 20).
Uses Meta's tokenizer from the `llama-models` package; without it, says so and falls back to the
byte-level tokenizer with a 512-id vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before jax is imported (by the imports below): the CPU, split into 8 emulated devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from llama_jax import compile_cache, platforms
from train.config import load_config
from train.corpus import facts, score
from train.loop import run
from train.tokenizers import BYTES, LLAMA3, load_tokenizer, meta_tokenizer_path

SHOWN = ("2+3=", "7+8=", "9+9=", "6-4=", "9-0=", "8-5=")


def _infer(run_dir: Path, prompts: list[list[int]], workdir: Path) -> list[list[int]]:
    """Greedy continuations (3 tokens) of `prompts` from the inference CLI, as token ids."""
    jobs = workdir / "prompts.jsonl"
    jobs.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    cmd = [sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(run_dir),
           "--file", str(jobs), "--json", "--max-new-tokens", "3", "--max-batch", "32"]  # fmt: skip
    print("$ python", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line)["generated_ids"] for line in out.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="run directory (default: a new temporary directory)")
    p.add_argument("--steps", type=int, help="training steps (default: configs/demo.yaml)")
    args = p.parse_args(argv)

    platforms.skip_absent_tpu()
    compile_cache.enable()
    out = Path(args.out or tempfile.mkdtemp(prefix="llama_jax_demo_"))
    overrides: dict = {"checkpoint_dir": str(out / "run")}
    if args.steps:
        overrides["steps"] = args.steps
    if meta_tokenizer_path() is None:
        print("NOTE: Meta's Llama 3 tokenizer (pip package llama-models) is not installed; "
              "falling back to the byte-level tokenizer and a 512-id vocabulary.")  # fmt: skip
        overrides["data"] = {"tokenizer": BYTES}
        overrides["model_overrides"] = {"vocab_size": 512}
    cfg = load_config("demo", overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    print(f"Training on builtin:arithmetic with the {cfg.data.tokenizer} tokenizer "
          f"({'Meta' if cfg.data.tokenizer == LLAMA3 else 'fallback'}) into {out}", flush=True)  # fmt: skip

    start = time.perf_counter()
    result = run(cfg)
    minutes = (time.perf_counter() - start) / 60
    first = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    print(f"\nTrained {cfg.steps} steps in {minutes:.1f} min: loss {first:.2f} -> "
          f"{result.last_metrics['loss']:.2f}\n")  # fmt: skip

    table = facts()
    prompts = [tokenizer.encode(q, bos=True) for q, _ in table]
    generated = _infer(out / "run", prompts, out)
    completions = {q: tokenizer.decode(ids) for (q, _), ids in zip(table, generated, strict=True)}
    answers = dict(table)
    for q in SHOWN:
        said = completions[q].split("<|")[0]  # up to <|end_of_text|>
        mark = "right" if score({q: completions[q]})[0] else f"wrong (expected {answers[q]})"
        print(f"  {q:<5} -> {said:<4} {mark}")
    right, total = score(completions)
    print(f"\n{right}/{total} single-digit sums and differences right "
          f"({100 * right / total:.0f}%; guessing from the answers seen gets about 5%)")  # fmt: skip
    print(f"Run directory (metrics.jsonl, tensorboard/, checkpoints/): {out / 'run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
