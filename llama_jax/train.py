"""`python -m llama_jax.train`: pretrain or fine-tune a Llama 3 model on a device mesh.

A run is a YAML config (a file, or a name from configs/) plus these flags, which override it;
`--set section.key=value` overrides any other field. A checkpoint directory that already holds
a checkpoint is resumed exactly; SIGTERM or Ctrl-C saves the step reached and stops (exit 143 or
130), and rerunning the same command goes on from there. Silent data corruption found by
--sdc-check-every exits 75, a hang caught by the watchdog 76.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from infer.generate import Completion, generate
from llama_jax import compile_cache, platforms
from llama_jax.api import Model
from llama_jax.config import CONTEXT_PARALLEL, LlamaConfig
from llama_jax.model import Params
from train.config import TrainConfig, load_config, parse_assignments
from train.loop import USER_ERRORS, dump_teacher, run
from train.rollouts import run_grpo

MAX_ROLLOUTS = 256  # decode slots of GRPO's sampler: a round's completions decode together

EXAMPLES = """examples:
  python -m llama_jax.train --config tiny-arithmetic --checkpoint-dir runs/a
  python -m llama_jax.train --config llama3.1-8b-lora-sft --init-from /ckpt/Llama3.1-8B-Instruct \\
      --data chats.jsonl --export-dir adapter/
  python -m llama_jax.train --config llama3.1-8b-dpo --init-from /ckpt/Llama3.1-8B-Instruct \\
      --data pairs.jsonl --checkpoint-dir runs/dpo
  python -m llama_jax.train --config llama3.2-1b-distill-from-8b --data docs/ \\
      --teacher /ckpt/Llama3.1-8B --checkpoint-dir runs/distill
  python -m llama_jax.train --preset llama3.2-1b --init-from /ckpt/Llama3.2-1B --sft \\
      --data chats.jsonl --mesh fsdp=-1 --steps 1000 --checkpoint-dir gs://bucket/run
"""

# Flag -> (config key path, type, what it does). Every flag defaults to "not given" so the
# config file's value stays; the help shows the built-in default the file can change.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--preset": ("model", str, "model preset to train from scratch (see lj.preset_names())"),
    "--steps": ("steps", int, "optimizer updates in all, counting those before a resume"),
    "--batch": ("data.batch", int, "global rows per step, split over hosts"),
    "--seq-len": ("data.seq_len", int, "tokens per row; documents are packed into rows"),
    "--mesh": ("mesh", str, "device mesh, e.g. fsdp=-1,tensor=4 or data=2:dcn,fsdp=-1"),
    "--rules": ("rules", str, "sharding rule preset: fsdp, fsdp_tp, dp, infer_tp"),
    "--seed": ("seed", int, "seed of the initial weights and the data order"),
    "--checkpoint-dir": (
        "checkpoint_dir",
        str,
        "run directory: checkpoints, metrics.jsonl, "
        "tensorboard/; resumed when it holds a checkpoint",
    ),
    "--save-every": ("save_every", int, "save a checkpoint every N steps (and at the end)"),
    "--keep": ("keep", int, "checkpoints kept, newest first"),
    "--init-from": (
        "init_from",
        str,
        "start from this checkpoint (Meta, HF, Orbax or a run directory) instead of --preset",
    ),
    "--tokenizer": (
        "data.tokenizer",
        str,
        "tokenizer file, 'llama3' (Meta's, from the llama-models package) or 'bytes'",
    ),
    "--grad-accum": ("grad_accum", int, "micro-batches accumulated per update"),
    "--loss-chunks": (
        "loss_chunks",
        int,
        "compute the head and loss over N slices of the sequence, for less memory",
    ),
    "--lr": ("optim.lr", float, "peak learning rate (linear warm-up, then cosine)"),
    "--lora-rank": (
        "lora.rank",
        int,
        "train LoRA adapters of this rank over the frozen base (0: train every weight)",
    ),
    "--lora-alpha": ("lora.alpha", float, "LoRA scale numerator: updates scaled by alpha/rank"),
    "--lora-targets": (
        "lora.targets",
        str,
        "projections that get adapters: q,k,v,o,gate,up,down (or all)",
    ),
    "--lora-dropout": ("lora.dropout", float, "dropout on each adapter's input"),
    "--objective": (
        "objective",
        str,
        "what to minimise: lm (pretraining, SFT), dpo, distill, grpo (sampled with the engine), "
        "reward (a reward model on preference pairs)",
    ),
    "--dpo-beta": ("dpo.beta", float, "DPO's beta: the strength of the reference anchor"),
    "--dpo-loss": ("dpo.loss", str, "sigmoid (DPO; cDPO with label smoothing), robust or ipo"),
    "--dpo-label-smoothing": (
        "dpo.label_smoothing",
        float,
        "the share of preference labels taken as flipped (conservative / robust DPO)",
    ),
    "--dpo-reference": (
        "dpo.reference",
        str,
        "auto (the LoRA base, else a frozen copy), frozen, or precomputed",
    ),
    "--center-rewards-coefficient": (
        "reward_model.center_rewards_coefficient",
        float,
        "reward models: weight of (r_chosen + r_rejected)^2, which centres rewards on 0",
    ),
    "--teacher": ("distill.teacher", str, "checkpoint of the distillation teacher"),
    "--teacher-topk": (
        "distill.topk_dir",
        str,
        "directory of the teacher's top-K log-probs (offline distillation)",
    ),
    "--dump-teacher-topk": (
        "dump_teacher_topk",
        int,
        "write the teacher's top-K log-probs of every batch into --teacher-topk, then stop",
    ),
    "--distill-temperature": ("distill.temperature", float, "temperature of both distributions"),
    "--distill-alpha": (
        "distill.alpha",
        float,
        "weight of the KL to the teacher; 1 - alpha weights the cross-entropy",
    ),
    "--prompts": (
        "grpo.prompts",
        str,
        "GRPO: prompts JSONL (prompt or messages, optional answer) or builtin:arithmetic[:SPLIT]",
    ),
    "--reward": (
        "grpo.reward",
        str,
        "GRPO: exact, regex:PATTERN, arithmetic, model:CHECKPOINT or python:MODULE:FN",
    ),
    "--num-generations": ("grpo.num_generations", int, "GRPO: completions per prompt (a group)"),
    "--prompts-per-step": ("grpo.prompts_per_step", int, "GRPO: prompts per round"),
    "--max-new-tokens": ("grpo.max_new_tokens", int, "GRPO: the longest completion sampled"),
    "--temperature": ("grpo.temperature", float, "GRPO: sampling temperature"),
    "--beta": ("grpo.beta", float, "GRPO: weight of the k3 KL to the reference (0: none)"),
    "--num-iterations": ("grpo.num_iterations", int, "GRPO: updates per round of samples"),
    "--grpo-loss": ("grpo.loss_type", str, "GRPO: loss aggregation dapo, bnpo, grpo or dr_grpo"),
    "--eval-prompts": (
        "grpo.eval_prompts",
        str,
        "GRPO: prompts answered greedily at the start, every --eval-every rounds and the end",
    ),
    "--eval-every": ("grpo.eval_every", int, "GRPO: rounds between evaluations (0: start, end)"),
    "--log-every": ("log_every", int, "log metrics every N steps"),
    "--bad-data": (
        "data.bad_data",
        str,
        "an unreadable document (named FILE:LINE): fail stops the run, skip logs and counts it",
    ),
    "--sdc-check-every": (
        "sdc_check_every",
        int,
        "every N steps, run the step again on other devices and compare replicas bitwise; "
        "a mismatch exits 75 (0: off)",
    ),
    "--watchdog-multiple": (
        "watchdog_multiple",
        float,
        "a step taking M times the median step time dumps all stacks and exits 76 (0: off)",
    ),
    "--export-dir": ("export_dir", str, "write the final weights here (format: export_format)"),
    "--export-format": (
        "export_format",
        str,
        "hf, meta, orbax, or peft (the LoRA adapter alone); auto: peft with LoRA, else hf",
    ),
}


def _default(key: str) -> Any:
    """The built-in default of a dotted TrainConfig field, e.g. `data.batch` -> 8."""
    node: Any = TrainConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.train",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML file, or the name of one in configs/ (default: none, built-in defaults)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text/JSONL files, directories or globs to train on (default: the config's)",
    )
    p.add_argument(
        "--sft",
        action="store_true",
        default=None,
        help="supervised fine-tuning: loss on assistant tokens of chat JSONL, or on the "
        "completion of prompt-completion JSONL, only "
        "(default: off, loss on every token)",
    )
    for flag, (key, kind, text) in FLAGS.items():
        p.add_argument(
            flag,
            type=kind,
            metavar=key.split(".")[-1].upper(),
            help=f"{text} (config key {key}; default {_default(key)!r})",
        )
    p.add_argument(
        "--context-parallel",
        choices=CONTEXT_PARALLEL,
        help="attention over a sequence split on the mesh's sequence axis: all_to_all (a heads "
        "split around the kernel), or load-balanced all_gather or ring (config key "
        "model_overrides.context_parallel; default all_to_all)",
    )
    p.add_argument(
        "--precompute-reference",
        action="store_true",
        default=None,
        help="DPO: score every pair with the starting model in a first pass and train against "
        "those log-probs, with no reference model in memory (--dpo-reference precomputed)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, value parsed as YAML, e.g. --set optim.warmup_steps=100 "
        "(repeatable)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(config file or name, nested overrides) from the command line."""
    args = parser().parse_args(argv)
    overrides = parse_assignments(args.set)
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, *_) in FLAGS.items()}
    given["data.paths"] = args.data
    given["data.sft"] = args.sft
    given["model_overrides.context_parallel"] = args.context_parallel
    if args.precompute_reference:
        given["dpo.reference"] = "precomputed"
    for key, value in given.items():
        if value is not None:
            *parents, leaf = key.split(".")
            node = overrides
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return args.config, overrides


def sample_groups(
    config: LlamaConfig,
    weights: Params,
    mesh: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    n: int,
    **sampling: Any,
) -> list[list[Completion]]:
    """GRPO's sampler (`train.rollouts.Sampler`): the engine over the trainer's weights as they
    lie, `n` completions per prompt, all of a round's in one batch."""
    model = Model(config, weights, tokenizer=tokenizer, mesh=mesh)
    out = generate(
        model, [list(p) for p in prompts], n=n, seeds=seeds, max_batch=MAX_ROLLOUTS, **sampling
    )
    return out if n > 1 else [[c] for c in out]


def main(argv: list[str] | None = None) -> int:
    config_name, overrides = parse_args(argv)
    platforms.skip_absent_tpu()
    compile_cache.enable()
    try:
        cfg = load_config(config_name, overrides)
        if cfg.dump_teacher_topk:
            steps = dump_teacher(cfg)
            print(f"wrote the teacher's top-{cfg.dump_teacher_topk} of {steps} steps")
            return 0
        if cfg.objective == "grpo":
            result, scores = run_grpo(cfg, sample_groups)
            if "after" in scores:
                print(f"eval_reward: {scores['before']:.4f} before, {scores['after']:.4f} after")
        else:
            result = run(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
