"""The reference side: `transformers.LlamaForCausalLM` in PyTorch on CPU, float32, all cores.

The model is loaded with `from_pretrained` from the HF checkpoint of our benchmark weights, with
the library's default attention (SDPA). Each row runs the way a PyTorch user would run it:

decode  -> `generate(do_sample=False, min_new_tokens=max_new_tokens)`; a streamer timestamps
           every token, so time to first token and per-step time come from the same call.
prefill -> one forward with `use_cache=True` and `logits_to_keep=1`.
train   -> forward, cross-entropy, `backward`, `clip_grad_norm_(1.0)` and `torch.optim.AdamW`
           with our optimizer's hyperparameters, in its fastest CPU form (fused).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks.workload import Row, prompt_tokens, train_batch


def load_model(hf_dir: Path) -> transformers.LlamaForCausalLM:
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


class _Stamps:
    """A `generate` streamer that records when each new token arrives (the first `put` is the
    prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Decode:
    def __init__(self, model: transformers.LlamaForCausalLM, row: Row):
        self.model, self.row = model, row
        self.prompt = torch.from_numpy(prompt_tokens(row, model.config.vocab_size))
        self.tokens: list[list[int]] = []

    @torch.inference_mode()
    def run(self) -> dict[str, float]:
        stamps = _Stamps()
        start = time.perf_counter()
        out = self.model.generate(
            self.prompt,
            attention_mask=torch.ones_like(self.prompt),
            do_sample=False,
            max_new_tokens=self.row.new_tokens,
            min_new_tokens=self.row.new_tokens,
            pad_token_id=0,
            streamer=stamps,
        )
        end = time.perf_counter()
        self.tokens = out[:, self.row.length :].tolist()
        first = stamps.times[1]
        return {
            "seconds": end - start,
            "first_token_s": first - start,
            "step_s": (end - first) / max(self.row.new_tokens - 1, 1),
        }

    def check(self) -> dict[str, Any]:
        return {"tokens": self.tokens}


class Prefill:
    def __init__(self, model: transformers.LlamaForCausalLM, row: Row):
        self.model = model
        self.tokens = torch.from_numpy(prompt_tokens(row, model.config.vocab_size))
        self.logits: np.ndarray | None = None

    @torch.inference_mode()
    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        out = self.model(self.tokens, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
        self.logits = out.logits[:, -1].numpy()
        return {"seconds": seconds}

    def check(self) -> dict[str, Any]:
        return {"logits": self.logits}


class Train:
    def __init__(self, model: transformers.LlamaForCausalLM, row: Row):
        self.model = model.train()
        batch = train_batch(row, model.config.vocab_size)
        self.tokens = torch.from_numpy(batch["tokens"]).long()
        self.targets = torch.from_numpy(batch["targets"]).long()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True
        )
        self.losses: list[float] = []

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return {"seconds": time.perf_counter() - start}

    def check(self) -> dict[str, Any]:
        return {"first_loss": self.losses[0]}


def make_runner(hf_dir: Path, row: Row) -> Any:
    model = load_model(hf_dir)
    return {"decode": Decode, "prefill": Prefill, "train": Train}[row.kind](model, row)
