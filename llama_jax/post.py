"""`python -m llama_jax.post`: post-training from sampled completions, and post-processing of
inference outputs (the code is in `train/`).

Subcommands:
  to-sft            a prompts file and its `python -m llama_jax.infer --file ... --json` output
                    -> chat JSONL for `python -m llama_jax.train --sft --data` (sequence-level
                    distillation)
  rejection-sample  sample --n completions of each prompt, score them with --reward and keep
                    the best (or all >= --threshold) as SFT JSONL (`train.rejection`)
  evaluate          the mean reward of greedy answers to --prompts, and of --n samples each
                    at --temperature (pass@1 and pass@n), as one JSON line
  grpo              online GRPO: `python -m llama_jax.train --objective grpo` and its flags
                    (`train.rollouts`; e.g. --config arithmetic-grpo --init-from RUN_DIR)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from infer.batching import Scheduler
from infer.cli import (
    USER_ERRORS,
    CLIError,
    add_model_args,
    check_fits,
    context_len,
    load_model,
    make_scheduler,
    positive,
    setup_logging,
)
from infer.engine import bucket
from infer.generate import Completion, complete
from infer.sampling import SamplingError, SamplingParams, choice_seed
from infer.tools import check_tools, with_tools
from llama_jax import compile_cache, platforms
from llama_jax import train as train_cli
from train.data import DataError
from train.generations import GenerationsError, to_sft
from train.prompts import PromptRow, builtin_split, longest, read_prompts
from train.rejection import Selection, describe, rejection_sample
from train.rewards import Reward, RewardError, parse_reward

PROG = "llama_jax.post"
# A batch of prompts is this many waves of the decode slots: a progress line per batch.
WAVES_PER_BATCH = 4
BEST = Selection()  # the best completion of each prompt


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True)
    sft = commands.add_parser(
        "to-sft", help="teacher generations -> chat SFT JSONL (sequence-level distillation)"
    )
    sft.add_argument("--prompts", required=True, help="the JSONL given to infer --file")
    sft.add_argument("--generations", required=True, help="infer --json's stdout, saved")
    sft.add_argument("--out", required=True, help="chat JSONL to write")
    add_keep_truncated(sft, "replies")

    rs = commands.add_parser(
        "rejection-sample", help="best-of-n completions by a reward -> SFT JSONL"
    )
    add_sampling_args(rs)
    rs.add_argument(
        "--out",
        required=True,
        help="SFT JSONL to write ({prompt, completion} or {messages}); the summary goes to "
        "OUT.summary.json",
    )
    rs.add_argument(
        "--threshold",
        type=float,
        help="keep every completion with a reward >= T (default: the best of each prompt)",
    )
    rs.add_argument(
        "--min-reward", type=float, help="drop a prompt whose best reward is below this"
    )
    add_keep_truncated(rs, "completions")

    ev = commands.add_parser("evaluate", help="mean reward of greedy and sampled answers")
    add_sampling_args(ev)
    commands.add_parser(
        "grpo",
        add_help=False,
        help="online GRPO; takes python -m llama_jax.train's flags (see its --help)",
    )
    return p


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The model, prompts, reward and sampling flags of rejection-sample and evaluate."""
    add_model_args(p)
    p.add_argument(
        "--prompts",
        required=True,
        help="prompts JSONL (prompt or messages, optional answer per line) or "
        "builtin:arithmetic[:all|train|heldout]",
    )
    p.add_argument("--n", type=positive, default=8, help="completions per prompt (default 8)")
    p.add_argument(
        "--reward",
        required=True,
        help="exact | regex:PATTERN | arithmetic | model:CHECKPOINT | python:MODULE:FN",
    )
    p.add_argument("--max-new-tokens", type=positive, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="default 1")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")


def add_keep_truncated(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--keep-truncated",
        action="store_true",
        help=f"keep {what} that ended by length (default: skip them)",
    )


def add_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tool definitions written into the prompt exactly as `python -m llama_jax.infer` did."""
    return with_tools(messages, check_tools(tools))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grpo"]:
        return train_cli.main(["--objective", "grpo", *argv[1:]])
    args = parser().parse_args(argv)
    commands = {
        "to-sft": run_to_sft,
        "rejection-sample": run_rejection_sample,
        "evaluate": run_evaluate,
    }
    try:
        commands[args.command](args)
    except (*USER_ERRORS, GenerationsError, DataError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_to_sft(args: argparse.Namespace) -> None:
    counts = to_sft(args.prompts, args.generations, args.out, args.keep_truncated, add_tools)
    skipped = (
        f"; skipped {counts.truncated_skipped} that ended by length (--keep-truncated keeps them)"
        if counts.truncated_skipped
        else ""
    )
    print(f"wrote {counts.written} chats to {args.out}{skipped}", file=sys.stderr)


def sampling(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
    except SamplingError as e:
        raise CLIError(f"--{e.field.replace('_', '-')} {e.reason}") from None


def generate_from(
    scheduler: Scheduler,
    params: SamplingParams,
    n: int,
    prompts: Sequence[Sequence[int]],
    first: int,
) -> list[list[Completion]]:
    """`train.rejection.Generate` over `scheduler`. Seeded, prompt k of the run is seeded with
    `choice_seed(seed, k * n)` and its samples from that, so prompts draw independently (one
    seed for all would give every prompt the same random draws) and the batching of prompts
    changes nothing."""
    seeds = None
    if params.seed is not None:
        seeds = [choice_seed(params.seed, (first + k) * n) for k in range(len(prompts))]
    return complete(scheduler, prompts, params, n, seeds)


@dataclass
class SamplingRun:
    """What rejection-sample and evaluate share: the loaded model, its prompts and the reward."""

    args: argparse.Namespace
    model: Any
    rows: list[PromptRow]
    reward: Reward

    @classmethod
    def start(cls, args: argparse.Namespace) -> SamplingRun:
        """The sampling flags, the reward spec and the prompts file are checked first, so a
        mistake in them fails before a long checkpoint load."""
        platforms.skip_absent_tpu()
        compile_cache.enable()
        setup_logging(args.verbose)
        sampling(args)
        reward = parse_reward(args.reward)
        if builtin_split(args.prompts) is None and not Path(args.prompts).is_file():
            raise DataError(f"--prompts {args.prompts}: no such file")
        model = load_model(args)
        if model.tokenizer is None:
            raise CLIError("--prompts needs a tokenizer and the model has none: pass --tokenizer")
        return cls(args, model, read_prompts(args.prompts, model.tokenizer), reward)

    def run(
        self, params: SamplingParams, n: int, out: str | None, selection: Selection = BEST
    ) -> dict[str, Any]:
        """`n` completions of every prompt with `params`, scored (and selected into `out`)."""
        args, rows = self.args, self.rows
        context = context_len(self.model, args)
        check_fits([(r.ids, params) for r in rows], context, f"--prompts {args.prompts}")
        per_batch = max(1, WAVES_PER_BATCH * args.max_batch // n)
        scheduler = make_scheduler(
            self.model,
            args,
            bucket(longest(rows) + params.max_new_tokens, 64, context),
            bucket(min(per_batch, len(rows)) * n, 1, args.max_batch),
            max_waiting=per_batch * n,
        )
        return rejection_sample(
            rows,
            partial(generate_from, scheduler, params, n),
            self.reward,
            out,
            selection,
            prompts_per_batch=per_batch,
            log=lambda line: print(f"{args.command}: {line}", file=sys.stderr, flush=True),
        )


def run_rejection_sample(args: argparse.Namespace) -> None:
    """Sample, score and write the SFT file."""
    run = SamplingRun.start(args)
    selection = Selection(args.threshold, args.min_reward, args.keep_truncated)
    summary = run.run(sampling(args), args.n, args.out, selection)
    print(describe(summary), file=sys.stderr)
    print(f"wrote {summary['kept']} rows to {args.out}", file=sys.stderr)


def run_evaluate(args: argparse.Namespace) -> None:
    """Greedy answers, then `--n` samples of each prompt; one JSON line on stdout."""
    run = SamplingRun.start(args)
    params = sampling(args)
    greedy = run.run(dataclasses.replace(params, temperature=0.0), 1, None)
    sampled = run.run(params, args.n, None)
    result = {
        "prompts": len(run.rows),
        "reward": args.reward,
        "greedy": greedy["reward"]["mean"],
        f"sampled_t{args.temperature:g}": sampled["reward"]["mean"],
        f"pass_at_{args.n}": sampled["pass_at_n"],
        "samples": sampled["samples"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
