"""`python -m llama_jax.infer`: generate from a prompt, a file of prompts or a chat REPL; and
`python -m llama_jax.infer serve`: the OpenAI-compatible server.

Every user mistake (bad flag value, missing tokenizer, prompt longer than the context, broken
checkpoint) ends in one line on stderr, `llama_jax.infer: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvicorn

from infer import lockstep
from infer.access_log import AccessLog
from infer.batching import Request, Scheduler, scheduler_for
from infer.code_shield import CodeShieldError, CodeShieldScanner, Policy, ScanResult
from infer.code_shield import load as load_code_shield_scanner
from infer.engine import DEFAULT_BLOCK_SIZE, EngineError, bucket
from infer.generate import Completion
from infer.guard import GuardVersion, LlamaGuard, Screening
from infer.ops import CANCEL_GRACE_S, Drain
from infer.sampling import SamplingError, SamplingParams
from infer.server import Limits, create_app
from infer.speculative import DEFAULT_DRAFT_TOKENS, SELF_INT8, Draft, DraftError, self_int8_draft
from infer.tools import check_tools, may_be_tool_call, with_tools
from llama_jax import compile_cache, platforms
from llama_jax.api import Model, init
from llama_jax.chat import encode_dialog, parse_assistant, require_chat_format
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.peft import merge_into
from llama_jax.config import ConfigError, preset
from llama_jax.kv_cache import QUANTIZED
from llama_jax.quantize import MODES, as_quantized
from llama_jax.tokenizer import BYTE_TOKENIZER, ByteTokenizer, open_tokenizer
from llama_jax.tokenizer_base import TokenizerError
from sharding.mesh import ShardingError, make_mesh
from sharding.place import place
from sharding.rules import resolver

PROG = "llama_jax.infer"


class CLIError(ValueError):
    """A user-facing error: printed as one line."""


# What a command line can get wrong (flags, files, a checkpoint that does not fit): one line
# naming it, no traceback.
USER_ERRORS = (
    CLIError,
    EngineError,
    CheckpointError,
    ConfigError,
    ShardingError,
    TokenizerError,
    OSError,
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


# --- flags shared by generation and serving ------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (Meta, HF, Orbax or a train run)")
    src.add_argument("--preset", help="random weights of a preset config (for benchmarks)")
    p.add_argument(
        "--tokenizer",
        help=f"tokenizer file, or {BYTE_TOKENIZER!r} for the byte-level one of small models "
        "(default: the checkpoint's own)",
    )
    p.add_argument("--mesh", help='device mesh, e.g. "tensor=4" or "data=2,tensor=4"')
    p.add_argument("--rules", default="infer_tp", help="sharding rule preset (default infer_tp)")
    p.add_argument("--dtype", help="cast parameters to float32 / bfloat16 / float16")
    p.add_argument(
        "--quantize",
        choices=tuple(MODES),
        help="weight-only quantization of every projection and the head at load: int8 or "
        "fp8 (e4m3), one scale per output channel (a checkpoint stored quantized needs none)",
    )
    p.add_argument("--lora", metavar="ADAPTER_DIR", help="merge this PEFT LoRA adapter at load")
    p.add_argument(
        "--max-seq-len",
        type=positive,
        help="context length (default: the model's; at most 8192 for --chat and serve)",
    )
    p.add_argument("--max-batch", type=positive, default=8, help="decode slots (default 8)")
    p.add_argument("--prefill-chunk", type=positive, default=512, help="prefill chunk tokens")
    p.add_argument("--steps-per-call", type=positive, default=1, help="decode steps per call")
    p.add_argument(
        "--draft",
        metavar=f"CHECKPOINT|{SELF_INT8}",
        help="speculative decoding: a smaller model of the same tokenizer proposes tokens, or "
        f"{SELF_INT8} (this model's weights in int8); greedy output is unchanged",
    )
    p.add_argument(
        "--draft-tokens",
        type=positive,
        default=DEFAULT_DRAFT_TOKENS,
        metavar="K",
        help=f"tokens the draft proposes per decode call (default {DEFAULT_DRAFT_TOKENS})",
    )
    p.add_argument(
        "--block-size",
        type=positive,
        help=f"KV cache block size in tokens (default {DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument(
        "--kv-blocks",
        type=positive,
        help="KV pool size in blocks (default: enough for every slot at the full context)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not share the KV blocks of prompt prefixes between requests",
    )
    p.add_argument(
        "--kv-layout",
        choices=("paged", "contiguous"),
        default="paged",
        help="paged (default): blocks of --block-size from one pool; contiguous: one "
        "whole-context row per slot (no prefix cache; for comparison)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", QUANTIZED),
        default="auto",
        help="KV cache storage: auto (default: the compute dtype) or int8 (per token, per "
        "KV head scales; about half the bytes of bfloat16)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log compiles and timings")


# (temperature, top_p) when not given: greedy for one-shot generation, Meta's chat defaults.
DEFAULTS = {"generate": (0.0, 1.0), "chat": (0.6, 0.9)}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0; --chat 0.6)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, help="1 = off (default 1; --chat 0.9)")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=id_list, help="stop token ids (default: the model's)")
    p.add_argument("--logprobs", action="store_true", help="report each token's log-prob")
    p.add_argument("--top-logprobs", type=int, default=0, help="also the N most likely tokens")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def id_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids, got {text!r}"
        ) from None


def sampling_from(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    temperature, top_p = DEFAULTS["chat" if args.chat else "generate"]
    fields = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=temperature if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=top_p if args.top_p is None else args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=args.stop_token_ids,
        logprobs=args.logprobs,
        top_logprobs=args.top_logprobs,
    )
    fields.update(overrides)
    try:
        return SamplingParams(**fields)
    except SamplingError as e:
        raise CLIError(f"--{e.field.replace('_', '-')} {e.reason}") from None


def load_model(args: argparse.Namespace) -> Model:
    """The model named by --checkpoint / --preset, placed on --mesh, with its tokenizer and
    the --lora adapter merged into its weights (so it runs as fast as the base)."""
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.checkpoint:
        shardings = None if mesh is None else resolver(mesh, args.rules)
        model = load(args.checkpoint, dtype=args.dtype, shardings=shardings)
    else:
        config = preset(args.preset)
        if args.dtype:
            config = config.replace(param_dtype=args.dtype)
        model = init(config)
        if mesh is not None:
            model.params, model.mesh = place(model.params, config, mesh, args.rules), mesh
    if args.lora:
        model = merge_into(model, args.lora)
    if args.quantize:
        try:
            model.params = as_quantized(model.params, model.config, args.quantize)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.tokenizer:
        try:
            model.tokenizer = (
                ByteTokenizer()
                if args.tokenizer == BYTE_TOKENIZER
                else open_tokenizer(args.tokenizer)
            )
        except TokenizerError as e:
            raise CLIError(f"--tokenizer: {e}") from None
    return model


# Chat and the server preallocate a cache of the whole context for every slot; past this many
# tokens (Llama 3.1 has 131072) that is tens of GB, so longer contexts must be asked for.
DEFAULT_RESIDENT_CONTEXT = 8192


def context_len(model: Any, args: argparse.Namespace, resident: bool = False) -> int:
    """--max-seq-len, bounded by the model's; `resident` (a cache kept for the whole context)
    defaults to at most DEFAULT_RESIDENT_CONTEXT."""
    default = model.config.max_seq_len
    if resident:
        default = min(default, DEFAULT_RESIDENT_CONTEXT)
    return min(args.max_seq_len or default, model.config.max_seq_len)


def make_scheduler(
    model: Model, args: argparse.Namespace, max_len: int, slots: int, max_waiting: int = 1024
) -> Scheduler:
    """The scheduler over `model`, its KV pool laid out as --kv-layout, --block-size and
    --kv-blocks say, stored as --kv-cache-dtype says."""
    block_size, num_blocks, prefix_cache = args.block_size, args.kv_blocks, args.prefix_cache
    if args.kv_layout == "contiguous":
        if block_size or num_blocks:
            raise CLIError("--kv-layout contiguous sets the block size and the pool itself")
        block_size, num_blocks, prefix_cache = max_len, slots, False
    return scheduler_for(
        model,
        slots=slots,
        max_len=max_len,
        max_waiting=max_waiting,
        prefix_cache=prefix_cache,
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        num_blocks=num_blocks,
        prefill_chunk=args.prefill_chunk,
        steps_per_call=args.steps_per_call,
        rules=args.rules,
        kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        draft=load_draft(model, args),
    )


def load_draft(model: Model, args: argparse.Namespace) -> Draft | None:
    """--draft as the engine's `Draft`: a checkpoint loaded as the target is (--dtype, --mesh),
    or the target quantized (self-int8)."""
    if args.draft is None:
        return None
    try:
        if args.draft == SELF_INT8:
            return self_int8_draft(model.config, model.params, args.draft_tokens)
        shardings = None if model.mesh is None else resolver(model.mesh, args.rules)
        draft = load(args.draft, dtype=args.dtype, shardings=shardings)
    except (DraftError, CheckpointError, ConfigError, OSError) as e:
        raise CLIError(f"--draft {args.draft}: {e}") from None
    return Draft(draft.config, draft.params, args.draft_tokens)


def need_tokenizer(model: Any, args: argparse.Namespace, flag: str) -> Any:
    if model.tokenizer is None:
        where = args.checkpoint or f"preset {args.preset}"
        raise CLIError(
            f"{flag} needs a tokenizer and {where} has none (tokenizer.model or tokenizer.json); "
            "pass --tokenizer FILE or use --prompt-ids"
        )
    return model.tokenizer


def need_chat_tokenizer(model: Any, args: argparse.Namespace, flag: str) -> Any:
    """The tokenizer, if it has the Llama 3 chat format (a SentencePiece one has none)."""
    tok = need_tokenizer(model, args, flag)
    try:
        require_chat_format(tok)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None
    return tok


# --- generation ----------------------------------------------------------------------------


def generation_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="Generate with a Llama model. Greedy by default (chat: temperature 0.6, "
        "top-p 0.9). `python -m llama_jax.infer serve --help` for the HTTP server.",
    )
    add_model_args(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="prompt text (encoded with BOS)")
    mode.add_argument("--prompt-ids", type=id_list, help="prompt token ids, e.g. 1,2,3")
    mode.add_argument("--file", help="JSONL: one {prompt | prompt_ids | messages, ...} per line")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--system", help="system message (--chat)")
    p.add_argument("--tools", help="JSON file with a list of OpenAI tool definitions (--chat)")
    p.add_argument("--json", action="store_true", help="one JSON object per result on stdout")
    add_code_shield_arg(p)
    add_sampling_args(p)
    return p


def add_code_shield_arg(p: argparse._ActionsContainer) -> None:
    p.add_argument("--code-shield", nargs="?", const=Policy.BLOCK.value, metavar="block|warn",
                   choices=[policy.value for policy in Policy],
                   help="scan each reply for insecure code with Meta's Code Shield: block what "
                   "it recommends blocking (default) or only warn")  # fmt: skip


def load_code_shield(args: argparse.Namespace) -> CodeShieldScanner | None:
    """The --code-shield scanner (its semgrep checked); None without the flag."""
    if not args.code_shield:
        return None
    try:
        return load_code_shield_scanner(args.code_shield)
    except CodeShieldError as e:
        raise CLIError(f"--code-shield: {e}") from None


BLOCKED_TEXT = "[blocked by Code Shield]"


def shown(text: str, scan: ScanResult | None) -> str:
    """A reply as printed: withheld when Code Shield blocks it."""
    return BLOCKED_TEXT if scan is not None and scan.blocked else text


def report(scan: ScanResult | None) -> None:
    """Code Shield's findings on stderr, after the reply they are about."""
    for issue in scan.issues if scan is not None else ():
        print(f"code shield: {issue['cwe_id']} ({issue['severity']}) line {issue['line']}: "
              f"{issue['description']}", file=sys.stderr)  # fmt: skip


def read_jobs(
    path: str, model: Any, args: argparse.Namespace
) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, sampling) per line of a JSONL file; a line may override sampling fields."""
    jobs = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise CLIError(f"--file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or len({"prompt", "prompt_ids", "messages"} & set(row)) != 1:
            raise CLIError(f"{where}: expected an object with one of prompt, prompt_ids, messages")
        if "prompt" in row:
            ids = need_tokenizer(model, args, where).encode(str(row.pop("prompt")), bos=True)
        elif "prompt_ids" in row:
            ids = row.pop("prompt_ids")
        else:
            tok = need_chat_tokenizer(model, args, where)
            ids = encode_dialog(
                tok, with_tools(row.pop("messages"), check_tools(row.pop("tools", [])))
            )
        if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            raise CLIError(f"{where}: prompt_ids must be a list of integers")
        try:
            jobs.append((ids, sampling_from(args, **row)))
        except TypeError:
            raise CLIError(f"{where}: unknown fields {sorted(row)}") from None
        except CLIError as e:
            raise CLIError(f"{where}: {e}") from None
    if not jobs:
        raise CLIError(f"--file {path}: no prompts")
    return jobs


def check_fits(jobs: Sequence[tuple[list[int], SamplingParams]], context: int, what: str) -> None:
    """Refuse a prompt the context cannot hold; warn (once) when generation will be cut short."""
    for ids, _ in jobs:
        if not 1 <= len(ids) <= context - 1:
            raise CLIError(
                f"{what}: prompt has {len(ids)} tokens, but the context (--max-seq-len) is "
                f"{context}, so it may have 1..{context - 1}"
            )
    longest = max(jobs, key=lambda job: len(job[0]) + job[1].max_new_tokens)
    warn_if_capped(len(longest[0]), longest[1].max_new_tokens, context)


def warn_if_capped(prompt_len: int, max_new_tokens: int, context: int) -> bool:
    """Print one warning when `max_new_tokens` does not fit after the prompt; True if so."""
    room = context - prompt_len
    if max_new_tokens <= room:
        return False
    print(
        f"{PROG}: warning: --max-new-tokens {max_new_tokens} does not fit: the context "
        f"(--max-seq-len {context}) leaves {room} tokens after a {prompt_len}-token prompt, "
        f"so generation stops there",
        file=sys.stderr,
    )
    return True


def run_prompts(model: Any, args: argparse.Namespace) -> None:
    if args.file:
        jobs, what = read_jobs(args.file, model, args), f"--file {args.file}"
    elif args.prompt is not None:
        ids = need_tokenizer(model, args, "--prompt").encode(args.prompt, bos=True)
        jobs, what = [(ids, sampling_from(args))], "--prompt"
    else:
        jobs, what = [(args.prompt_ids, sampling_from(args))], "--prompt-ids"
    context = context_len(model, args)
    check_fits(jobs, context, what)
    shield = load_code_shield(args)
    needed = max(len(ids) + s.max_new_tokens for ids, s in jobs)
    scheduler = make_scheduler(
        model, args, bucket(needed, 64, context), bucket(len(jobs), 1, args.max_batch)
    )
    # A reply Code Shield scans is shown once scanned.
    stream = len(jobs) == 1 and not args.json and model.tokenizer is not None and shield is None
    on_update = (lambda _, piece: print(piece, end="", flush=True)) if stream else None
    requests = [scheduler.submit(ids, s, on_update) for ids, s in jobs]
    scheduler.run_until_done(requests)
    for r in requests:
        scan = shield.scan_blocking(r.text) if shield is not None else None
        if args.json:
            out = result_json(r, decoded=model.tokenizer is not None)
            if scan is not None:
                out["code_shield"] = scan.to_json()
            print(json.dumps(out), flush=True)
            continue
        if stream:
            print()
        elif model.tokenizer is None:
            print(" ".join(map(str, r.token_ids)))
        else:
            print(shown(r.text, scan))
        report(scan)
    logging.getLogger(PROG).info("compiled: %s", scheduler.engine.compiles)
    if scheduler.engine.draft is not None:
        stats = scheduler.stats
        logging.getLogger(PROG).info(
            "speculative decoding: %d of %d draft tokens accepted (%.1f%%)",
            stats.draft_accepted, stats.draft_proposed, 100 * stats.acceptance_rate,
        )  # fmt: skip


# Why "text" is null in --json output: the ids were never decoded.
NO_TOKENIZER_NOTE = (
    "text is null: no tokenizer (the checkpoint has no tokenizer.model or tokenizer.json); "
    "pass --tokenizer FILE to decode generated_ids"
)


def result_json(r: Request, decoded: bool = True) -> dict[str, Any]:
    """One result for --json. Without a tokenizer (`decoded` False) "text" is null and a
    "note" says why, so an absent text is never mistaken for an empty generation."""
    c = Completion.of(r)
    out = {
        "prompt_ids": c.prompt_ids,
        "generated_ids": c.token_ids,
        "text": c.text if decoded else None,
        "finish_reason": c.finish_reason,
        "timings": c.timings,
    }
    if not decoded:
        out["note"] = NO_TOKENIZER_NOTE
    if c.logprobs is not None:
        out["logprobs"] = c.logprobs
    if c.top_logprobs is not None:
        out["top_logprobs"] = c.top_logprobs
    return out


# --- chat ----------------------------------------------------------------------------------


def run_chat(model: Any, args: argparse.Namespace) -> None:
    """Read user turns from stdin, stream the assistant's replies. `/reset` forgets the
    conversation, `/tool TEXT` answers a tool call with its result, `/exit` (or EOF) quits."""
    tok = need_chat_tokenizer(model, args, "--chat")
    tools = load_tools(args.tools)
    shield = load_code_shield(args)
    params = sampling_from(args)
    context = context_len(model, args, resident=True)
    scheduler = make_scheduler(model, args, context, 1)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    print("chat: /reset forgets, /tool TEXT answers a tool call, /exit quits", file=sys.stderr)
    warned = False
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not interactive:  # no terminal echoes piped input: show the turn being answered
            print(f"> {line}", file=sys.stderr, flush=True)
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if line.startswith("/tool "):
            history.append({"role": "tool", "content": line[len("/tool ") :]})
        elif line.strip():
            history.append({"role": "user", "content": line})
        else:
            continue
        ids = encode_dialog(tok, with_tools(history, tools))
        if len(ids) > context - 1:
            print(f"{PROG}: error: the conversation has {len(ids)} tokens, more than the "
                  f"context ({context}) allows; /reset to start over", file=sys.stderr)  # fmt: skip
            history.pop()
            continue
        warned = warned or warn_if_capped(len(ids), params.max_new_tokens, context)
        quiet = args.json or shield is not None  # a scanned reply is shown once scanned
        request, streamed = chat_turn(scheduler, ids, params, hold=bool(tools), quiet=quiet)
        message = parse_assistant(tok, request.token_ids) if tools else None
        if message is None or not message["tool_calls"]:
            message = {"role": "assistant", "content": request.text}
        history.append(message)
        scan = shield.scan_blocking(request.text) if shield is not None else None
        if args.json:
            out = {**result_json(request), "message": message}
            if scan is not None:
                out["code_shield"] = scan.to_json()
            print(json.dumps(out), flush=True)
            continue
        if streamed:
            print()
        calls = message.get("tool_calls") or []
        for call in calls:
            print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
        if not streamed and not calls:
            print(shown(request.text, scan), flush=True)
        report(scan)


def load_tools(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return []
    try:
        return check_tools(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CLIError(f"--tools {path}: {e}") from None


def chat_turn(
    scheduler: Scheduler, ids: list[int], params: SamplingParams, hold: bool, quiet: bool
) -> tuple[Request, bool]:
    """Generate one reply, streaming it to stdout unless `quiet`. With `hold` (tools on offer),
    text that may still become a tool call is held back. Returns (request, whether any text
    was streamed); the caller shows what was held."""
    pending: list[str] = []
    streamed = False

    def on_update(request: Request, piece: str) -> None:
        nonlocal streamed
        pending.append(piece)
        if quiet or (hold and not streamed and may_be_tool_call("".join(pending))):
            return
        print("".join(pending), end="", flush=True)
        pending.clear()
        streamed = True

    request = scheduler.submit(ids, params, on_update)
    scheduler.run_until_done([request])
    return request, streamed


# --- `python -m llama_jax.infer serve` -----------------------------------------------------


def server_parser() -> Parser:
    p = Parser(prog=f"{PROG} serve", description="OpenAI-compatible HTTP server.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id reported and accepted (default: the dir name)")
    p.add_argument("--max-body-bytes", type=positive, default=Limits.max_body_bytes)
    p.add_argument("--max-tokens", type=positive, help="max_tokens bound (default: the context)")
    p.add_argument("--max-waiting", type=positive, default=64,
                   help="queued requests beyond the decode slots; more get 429 (default 64)")  # fmt: skip
    p.add_argument("--quiet", action="store_true",
                   help="no access-log line per request (the ready line is still printed)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("LLAMA_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes "
                   "(default: $LLAMA_JAX_API_KEY; none: open)")  # fmt: skip
    p.add_argument("--request-timeout", type=positive_seconds, metavar="SECONDS",
                   help="cancel a request after this long and answer 408 (default: none)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, how long requests in flight may take to finish "
                   "before they are cancelled (default 30)")  # fmt: skip
    guard = p.add_argument_group("content safety (a Llama Guard model beside the served one)")
    guard.add_argument("--guard", metavar="CHECKPOINT",
                       help="Llama Guard 3 (or 2) checkpoint: serves POST /v1/moderations")  # fmt: skip
    guard.add_argument("--guard-version", type=int, choices=(3, 2), default=3,
                       help="Llama Guard version of --guard (default 3)")  # fmt: skip
    guard.add_argument("--guard-input", action="store_true",
                       help="screen each chat conversation before generating")  # fmt: skip
    guard.add_argument("--guard-output", action="store_true",
                       help="screen each chat reply (streamed replies are sent once screened)")  # fmt: skip
    guard.add_argument("--guard-threshold", type=float, default=0.5, metavar="P",
                       help="block when P(unsafe) >= P (default 0.5)")  # fmt: skip
    guard.add_argument("--guard-excluded", type=code_list, default=(), metavar="S1,S5",
                       help="categories the guard does not check")  # fmt: skip
    add_code_shield_arg(guard)
    lockstep.add_args(p)
    return p


def code_list(text: str) -> tuple[str, ...]:
    return tuple(c.strip().upper() for c in text.split(",") if c.strip())


def load_screening(args: argparse.Namespace) -> Screening | None:
    """The --guard model and what the server screens with it; None without --guard."""
    if not args.guard:
        if args.guard_input or args.guard_output:
            raise CLIError("--guard-input and --guard-output need --guard CHECKPOINT")
        return None
    mesh = make_mesh(args.mesh) if args.mesh else None
    shardings = None if mesh is None else resolver(mesh, args.rules)
    model = load(args.guard, dtype=args.dtype, shardings=shardings)
    try:
        guard = LlamaGuard(model, GuardVersion(args.guard_version), slots=args.max_batch)
        return Screening(
            guard,
            model_name=Path(args.guard).name,
            screen_input=args.guard_input,
            screen_output=args.guard_output,
            threshold=args.guard_threshold,
            excluded=args.guard_excluded,
        )
    except ValueError as e:
        raise CLIError(f"--guard: {e}") from None


def serve(model: Model, args: argparse.Namespace, group: lockstep.Group | None = None) -> None:
    """Build the app of `infer.server` over the model and run it until interrupted. In a
    multi-host job (`group`) only process 0 serves; the others follow its engine calls."""
    context = context_len(model, args, resident=True)
    if group is not None and args.draft:  # the followers mirror plain engine calls only
        raise CLIError("--draft is not supported in a multi-host job")
    scheduler = make_scheduler(model, args, context, args.max_batch, args.max_waiting)
    if group is not None and args.guard:
        raise CLIError("--guard is not supported in a multi-host job")
    screening = load_screening(args)
    code_shield = load_code_shield(args)
    if group is not None:
        if not group.serving:
            print(f"process {group.rank}: following process 0", file=sys.stderr, flush=True)
            return lockstep.follow(group, scheduler.engine)
        scheduler.engine = lockstep.LockstepEngine(group, scheduler.engine)
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens or context,
        request_timeout=args.request_timeout,
    )
    name = args.model_name or (Path(args.checkpoint).name if args.checkpoint else args.preset)
    app = create_app(
        scheduler,
        model_name=name,
        limits=limits,
        api_key=args.api_key,
        screening=screening,
        code_shield=code_shield,
    )
    if not args.quiet:
        app.add_middleware(AccessLog, write=partial(print, flush=True))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        limit_concurrency=args.max_batch + args.max_waiting + 16,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=CANCEL_GRACE_S,  # the drain has waited already
    )
    try:
        AnnouncingServer(config, name, app.state.drain, args.shutdown_timeout).run()
    finally:
        if group is not None:
            group.stop()


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server, printing one line once it accepts requests: where, and which model.

    The first SIGTERM or Ctrl-C drains (`infer.ops.Drain`: new requests get 503 while the
    ones in flight finish, for up to `shutdown_timeout` seconds) before uvicorn's own
    shutdown; the process then exits 0. A second signal is uvicorn's (Ctrl-C forces)."""

    def __init__(
        self, config: uvicorn.Config, model_name: str, drain: Drain, shutdown_timeout: float
    ) -> None:
        super().__init__(config)
        self.model_name, self.drain, self.shutdown_timeout = model_name, drain, shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self.drain.draining:
            return super().handle_exit(sig, frame)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.drain.run(self.shutdown_timeout)
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(
                f"serving {self.model_name!r} at http://{host}:{port}/v1 "
                f"(OpenAI API; Ctrl-C to stop)",
                flush=True,
            )


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    platforms.skip_absent_tpu()
    compile_cache.enable()
    try:
        if argv[:1] == ["serve"]:
            args = server_parser().parse_args(argv[1:])
            setup_logging(args.verbose)
            group = lockstep.join(args)
            serve(load_model(args), args, group)
        else:
            args = generation_parser().parse_args(argv)
            setup_logging(args.verbose)
            sampling_from(args)  # bad sampling flags fail before a long checkpoint load
            model = load_model(args)
            run_chat(model, args) if args.chat else run_prompts(model, args)
    except USER_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
