"""The lm-evaluation-harness model "llama-jax": any checkpoint `llama_jax.load` reads, scored
on a device mesh.

    lm_eval --model llama-jax \\
        --model_args checkpoint=DIR,mesh=data=-1+tensor=2,dtype=bfloat16 --tasks hellaswag

lm-eval 0.4 looks models up only in its own registry (no plugin entry points): the installed
start-up hook (`infer.lm_eval_hook`) registers this class lazily for the `lm_eval` command, and
`run_cli` (`python -m llama_jax.eval lm-eval`) runs the same CLI after importing this module.
model_args are split on commas, so a mesh of several axes joins them with "+" or ";".

Tokenization follows lm-eval's Hugging Face backend on a Llama 3 tokenizer (which adds BOS):
a context is encoded with BOS and `context + continuation` is encoded whole and split after
the context's tokens; an empty context is the BOS alone. Log-likelihoods are computed by
`infer.scoring.Scorer` (batched, jitted, reduced on device); generation runs through the
serving scheduler (`infer.batching`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.__main__
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import maybe_truncate, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from infer.batching import scheduler_for
from infer.cli import load_model
from infer.engine import bucket
from infer.sampling import SamplingParams
from infer.scoring import Scorer, Window

NAME = "llama-jax"
DEFAULT_BATCH = 8
# lm-eval's default `max_gen_toks` (its Hugging Face backend's too).
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value: int | str | None) -> int:
    """lm-eval's --batch_size: an int, or "auto"/"auto:N" (no memory probing here: the
    default)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return size


@register_model(NAME)
class LlamaJaxLM(TemplateLM):
    """An lm-eval `LM` over a `llama_jax` checkpoint.

    `mesh` ("tensor=2", "data=-1+tensor=2") places the params with sharding `rules`; `dtype`
    casts them; `max_length` bounds the window (default: the model's context); `tokenizer`
    replaces the checkpoint's own; `quantize` ("int8", "fp8") quantizes the weights at load.
    `add_bos_token` (default True, as Llama 3's Hugging Face tokenizer does) prefixes encoded
    contexts with BOS. lm-eval also passes `device` and
    `max_batch_size`, which mean nothing here: placement is the mesh's, batches are fixed.
    """

    def __init__(
        self,
        checkpoint: str,
        mesh: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH,
        max_length: int | None = None,
        tokenizer: str | None = None,
        rules: str = "infer_tp",
        add_bos_token: bool = True,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        quantize: str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        spec = None if mesh is None else str(mesh).replace("+", ",").replace(";", ",")
        options = {"mesh": spec, "rules": rules, "dtype": dtype, "tokenizer": tokenizer,
                   "quantize": quantize}  # fmt: skip
        model = load_model(
            argparse.Namespace(checkpoint=checkpoint, preset=None, lora=None, **options)
        )
        if model.tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer: pass model_args tokenizer=FILE")
        self.model, self.text_tokenizer = model, model.tokenizer
        self.add_bos_token, self._max_gen_toks = add_bos_token, max_gen_toks
        self.scorer = Scorer(model, max_length, _batch_size(batch_size), rules)
        # HF tokenizers read special-token text ("<|eot_id|>" in a formatted prompt) as the
        # token; Llama 3's tiktoken tokenizers do so when told to, SentencePiece has none.
        # SentencePiece decodes BOS to "", which no text counts as starting with.
        self._bos_text = self.tok_decode([self.prefix_token_id])
        self._encode_kwargs = (
            {"allowed_special": "all"} if hasattr(self.text_tokenizer, "special_tokens") else {}
        )

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.text_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.text_tokenizer, "path", type(self.text_tokenizer).__name__))

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of `string`, with BOS if `add_special_tokens` (None: `add_bos_token`, unless the
        text already starts with BOS's text, as lm-eval's Hugging Face backend decides)."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            bos = False
        return self.text_tokenizer.encode(string, bos=bos, **self._encode_kwargs)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    def _score(self, windows: Sequence[Window], disable_tqdm: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(windows), desc="Scoring", disable=disable_tqdm) as bar:
            return self.scorer.score(windows, on_batch=bar.update)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        answers = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (pair, _, _), answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Each text's whole log-likelihood over lm-eval's disjoint rolling windows of
        `max_length` tokens, the first conditioned on BOS. The text is encoded without BOS:
        BOS is the prefix, not a token to predict (lm-eval 0.4's Hugging Face backend encodes
        it with the tokenizer's default, and on a BOS-adding tokenizer also scores a BOS
        after the prefix BOS)."""
        per_text: list[list[Window]] = []
        for (string,) in (r.args for r in requests):
            ids = self.tok_encode(string, add_special_tokens=False)
            rolling = lm_utils.get_rolling_token_windows(
                token_list=ids,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            per_text.append([lm_utils.make_disjoint_window(w) for w in rolling])
        scores = iter(self._score([w for ws in per_text for w in ws], disable_tqdm))
        totals = []
        for (string,), windows in zip((r.args for r in requests), per_text, strict=True):
            total = sum(next(scores)[0] for _ in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop string, EOS or `max_gen_toks`, greedy
        unless the request's gen_kwargs sample. All requests share one scheduler, which
        batches them continuously over `batch_size` slots; contexts too long are cut from
        the left to leave room for the generation."""
        jobs = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            ids, max_new = maybe_truncate(
                self.tok_encode(context), kw["max_gen_toks"], self.max_length
            )
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=float(kw.get("temperature") or 0.0) if kw["do_sample"] else 0.0,
                top_p=float(kw.get("top_p") or 1.0),
                top_k=int(kw.get("top_k") or 0),
                stop=tuple(s for s in kw["until"] if s),
            )
            jobs.append((ids, params, kw["until"]))
        if not jobs:
            return []
        scheduler = scheduler_for(
            self.model,
            slots=self.scorer.batch_size,
            max_len=bucket(
                max(len(ids) + p.max_new_tokens for ids, p, _ in jobs), 64, self.max_length
            ),
            max_waiting=len(jobs),
        )
        running = [scheduler.submit(ids, params) for ids, params, _ in jobs]
        scheduler.run_until_done(running)
        out = []
        for request, (context, gen_kwargs), (_, _, until) in zip(
            running, (r.args for r in requests), jobs, strict=True
        ):
            text = postprocess_generated_text(request.text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def run_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line (`lm_eval ARGS`), with "llama-jax" registered."""
    sys.argv = ["lm_eval", *argv]
    lm_eval.__main__.cli_evaluate()
    return 0
