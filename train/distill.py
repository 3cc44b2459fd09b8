"""Knowledge distillation: a student trained on a teacher's next-token distributions.

The loss per counted token is `alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE`, where p_T and
q_T are the teacher's and the student's softmax at temperature T (forward KL: the student must
cover every token the teacher gives mass to), T^2 keeps the gradient's size independent of T
(Hinton et al.), and CE is the ordinary cross-entropy on the data's targets.

The teacher comes online (its weights `frozen["teacher"]`, any config with the same vocabulary,
run in the step under stop_gradient) or offline: a `TopKDump` of its top-K log-probs per
position, written once by `dump_teacher_topk` over exactly the batches the student will see,
read back per step into the batch as `teacher_ids` / `teacher_logps`. Offline the KL sums over
the K kept ids only; with K = vocab it is the online loss. Both heads are applied over slices of
the sequence (`chunked_sum`), so only one slice's [tokens, vocab] logits exist at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.model import Params, output_logits
from sharding.rules import with_rules
from train.data import DataConfig
from train.step import Batch, Frozen, LossParts, Objective, Policy, chunked_sum

TEACHER = "teacher"  # the key of the online teacher's weights in `frozen`
TOPK_KEYS = ("teacher_ids", "teacher_logps")
MANIFEST = "manifest.json"


class DistillError(ValueError):
    """Distillation settings, a teacher or a top-K dump that does not fit the run."""


@dataclass(frozen=True)
class DistillConfig:
    """`temperature` T softens both distributions; `alpha` weighs the KL term and `1 - alpha`
    the cross-entropy on the targets. `teacher`: checkpoint of an online teacher; `topk_dir`:
    a directory of offline top-K dumps."""

    temperature: float = 1.0
    alpha: float = 1.0
    teacher: str | None = None
    topk_dir: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistillError(f"distill temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"distill alpha must be in [0, 1], got {self.alpha}")


def check_teacher(student: LlamaConfig, teacher: LlamaConfig, where: str) -> None:
    """The KL compares distributions id by id, so both models must share the vocabulary."""
    if student.vocab_size != teacher.vocab_size:
        raise DistillError(
            f"--teacher {where}: vocab_size {teacher.vocab_size} differs from the student's "
            f"{student.vocab_size}; distillation needs the same tokenizer"
        )


# --- the loss --------------------------------------------------------------------------------


def _kl_ce(
    student_logits: jax.Array, targets: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """(student log-softmax at T [..., V], cross-entropy of `targets` at T = 1 [...])."""
    log_q = jax.nn.log_softmax(student_logits / temperature)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets)
    return log_q, ce


def _sums(kl: jax.Array, ce: jax.Array, mask: jax.Array, cfg: DistillConfig) -> dict[str, Any]:
    """Masked sums of one slice: the mixed loss, and kl and ce for the metrics."""
    kl_sum, ce_sum = jnp.sum(kl * mask), jnp.sum(ce * mask)
    loss = cfg.alpha * cfg.temperature**2 * kl_sum + (1.0 - cfg.alpha) * ce_sum
    return {"loss": loss, "kl": kl_sum, "ce": ce_sum}


def distill_objective(
    policy: Policy,
    teacher_config: LlamaConfig | None,
    cfg: DistillConfig,
    loss_chunks: int = 1,
) -> Objective:
    """The distillation objective (see the module docstring) for `build_step`.

    Online (`teacher_config` given): the teacher's weights are `frozen["teacher"]`. Offline
    (`teacher_config` None): the batch carries `teacher_ids` int32 [B, T, K] and
    `teacher_logps` float32 [B, T, K], the teacher's log-probs at `cfg.temperature`.
    count: counted tokens; means: kl (at T, before the T^2 factor), ce; totals: loss_tokens,
    tokens.
    """
    t = cfg.temperature

    def online(params: Params, frozen: Frozen, batch: Batch, hidden: jax.Array) -> dict:
        teacher = jax.lax.stop_gradient(frozen[TEACHER])  # constants: no backward pass
        teacher_hidden = Policy(teacher_config).hidden(teacher, {}, batch)

        def chunk(h: jax.Array, th: jax.Array, y: jax.Array, m: jax.Array) -> dict:
            log_q, ce = _kl_ce(output_logits(params, h, config=policy.config), y, t)
            teacher_logits = output_logits(teacher, th, config=teacher_config)
            log_p = jax.nn.log_softmax(teacher_logits / t)
            kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
            return _sums(kl, ce, m, cfg)

        arrays = (hidden, teacher_hidden, batch["targets"], _mask(batch))
        return chunked_sum(chunk, arrays, loss_chunks)

    def offline(params: Params, frozen: Frozen, batch: Batch, hidden: jax.Array) -> dict:
        def chunk(h: jax.Array, y: jax.Array, m: jax.Array, ids: jax.Array, lp: jax.Array):
            log_q, ce = _kl_ce(output_logits(params, h, config=policy.config), y, t)
            kl = jnp.sum(jnp.exp(lp) * (lp - jnp.take_along_axis(log_q, ids, axis=-1)), axis=-1)
            return _sums(kl, ce, m, cfg)

        arrays = (hidden, batch["targets"], _mask(batch), *(batch[k] for k in TOPK_KEYS))
        return chunked_sum(chunk, arrays, loss_chunks)

    sums_of = offline if teacher_config is None else online

    def objective(trainable: Params, frozen: Frozen, batch: Batch, rng: jax.Array) -> LossParts:
        hidden = policy.hidden(trainable, frozen, batch, rng)
        sums = sums_of(policy.params(trainable, frozen), frozen, batch, hidden)
        n = jnp.sum(_mask(batch))
        tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
        means = {"kl": sums["kl"], "ce": sums["ce"]}
        return LossParts(sums["loss"], n, means, {"loss_tokens": n, "tokens": tokens})

    return objective


def _mask(batch: Batch) -> jax.Array:
    return batch["loss_mask"].astype(jnp.float32)


# --- the teacher's top-K ---------------------------------------------------------------------


def teacher_topk(
    params: Params,
    config: LlamaConfig,
    batch: Batch,
    k: int,
    temperature: float,
    chunks: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """(ids int32 [B, T, K], log-probs float32 [B, T, K]): the K most likely next tokens at
    each position and their log-softmax at `temperature` over the full vocabulary. Jit it with
    everything but `params` and `batch` static. The head runs over `chunks` slices of the
    sequence, strided as in `chunked_sum`, so one slice's logits exist at a time."""
    if not 1 <= k <= config.vocab_size:
        raise DistillError(f"--dump-teacher-topk {k}: K must be in 1..{config.vocab_size}")
    hidden = Policy(config).hidden(params, {}, batch)

    def top(h: jax.Array) -> tuple[jax.Array, jax.Array]:
        logps = jax.nn.log_softmax(output_logits(params, h, config=config) / temperature)
        values, ids = jax.lax.top_k(logps, k)
        return ids.astype(jnp.int32), values.astype(jnp.float32)

    if chunks == 1:
        return top(hidden)
    b, length = hidden.shape[:2]
    if length % chunks:
        raise DistillError(f"loss_chunks ({chunks}) must divide the sequence length {length}")
    sliced = jnp.moveaxis(hidden.reshape(b, length // chunks, chunks, -1), 2, 0)
    ids, logps = jax.lax.map(top, sliced)  # [chunks, b, length / chunks, k] each
    return tuple(jnp.moveaxis(x, 0, 2).reshape(b, length, k) for x in (ids, logps))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global [B, ...] array, assembled from its addressable shards
    (rows held by several local devices, replicas, are written once per device, identically)."""
    shards = x.addressable_shards
    starts = [s.index[0].indices(x.shape[0])[:2] for s in shards]
    first, last = min(a for a, _ in starts), max(b for _, b in starts)
    out = np.empty((last - first, *x.shape[1:]), x.dtype)
    for shard, (start, stop) in zip(shards, starts, strict=True):
        out[(slice(start - first, stop - first), *shard.index[1:])] = np.asarray(shard.data)
    return out


# --- the offline store -----------------------------------------------------------------------


def topk_manifest(
    data: DataConfig, seed: int, processes: int, temperature: float, vocab_size: int
) -> dict[str, Any]:
    """What fixes the batches and the teacher's numbers: a dump is valid for a student run
    only if all of it matches. `TopKDump.create` adds k and the teacher checkpoint."""
    return {
        "temperature": temperature,
        "vocab_size": vocab_size,
        "seq_len": data.seq_len,
        "batch": data.batch,
        "seed": seed,
        "data": list(data.paths),
        "sft": data.sft,
        "tokenizer": data.tokenizer,
        "packing_bins": data.packing_bins,
        "processes": processes,
    }


@dataclass(frozen=True)
class TopKDump:
    """A directory of the teacher's top-K per step and process (`step_00000001.p00000.npz`,
    this process's rows), described by `manifest.json` (written first). Every file is written
    to a temporary name and renamed, so a reader never sees half a file."""

    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def create(cls, directory: str | Path, manifest: dict[str, Any]) -> TopKDump:
        """A dump to write; an existing one with the same manifest is continued."""
        path = Path(directory)
        manifest = _normalised(manifest)
        if (path / MANIFEST).is_file():
            return cls.open(path, manifest)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        return cls(path, manifest)

    @classmethod
    def open(cls, directory: str | Path, expected: dict[str, Any]) -> TopKDump:
        """A dump to read, refused unless every field of `expected` matches its manifest."""
        path = Path(directory) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DistillError(f"--teacher-topk {directory}: no {MANIFEST}") from None
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}: not valid JSON ({e.msg})") from None
        for key, value in _normalised(expected).items():
            if manifest.get(key) != value:
                raise DistillError(
                    f"{path}: {key} is {manifest.get(key)!r} but this run's is {value!r}; "
                    "dump the teacher again for this run's settings"
                )
        return cls(Path(directory), manifest)

    def path(self, step: int, process: int) -> Path:
        return self.directory / f"step_{step:08d}.p{process:05d}.npz"

    def write(self, step: int, process: int, ids: np.ndarray, logps: np.ndarray) -> None:
        arrays = {"teacher_ids": ids.astype(np.int32), "teacher_logps": logps.astype(np.float32)}
        _atomic_write(self.path(step, process), lambda f: np.savez(f, **arrays))

    def read(self, step: int, process: int) -> dict[str, np.ndarray]:
        """`teacher_ids` int32 and `teacher_logps` float32, [rows, seq_len, k] each."""
        path = self.path(step, process)
        try:
            with np.load(path) as f:
                arrays = {key: f[key] for key in TOPK_KEYS}
        except FileNotFoundError:
            raise DistillError(
                f"{path}: missing; the dump covers fewer steps than this run needs"
            ) from None
        shape = arrays["teacher_ids"].shape
        if shape[1:] != (self.manifest["seq_len"], self.manifest["k"]):
            raise DistillError(
                f"{path}: arrays are {shape}, expected [rows, {self.manifest['seq_len']}, "
                f"{self.manifest['k']}]"
            )
        return arrays


def _normalised(manifest: dict[str, Any]) -> dict[str, Any]:
    """As JSON reads it back (tuples become lists), so a fresh manifest compares equal."""
    return json.loads(json.dumps(manifest))


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)


def dump_teacher_topk(
    teacher_params: Params,
    teacher_config: LlamaConfig,
    batches: Iterable[tuple[int, Batch]],
    dump: TopKDump,
    k: int,
    temperature: float,
    process: int,
    *,
    chunks: int = 1,
    total: int | None = None,
    mesh: Mesh | None = None,
    rules: str = "fsdp",
) -> int:
    """Write the teacher's top-K of each (step, batch) to `dump` (this process's rows of a
    global batch, or all rows of a local one); steps already on disk are skipped, so an
    interrupted dump resumes. With a `mesh`, the model's activation constraints follow `rules`
    as in the train step. A progress bar on process 0. Returns the steps written."""
    stored = (dump.manifest.get("k"), dump.manifest["temperature"])
    if stored != (k, temperature):
        raise DistillError(
            f"{dump.directory}: its manifest has k, temperature = {stored}, not {(k, temperature)}"
        )
    fn = partial(teacher_topk, config=teacher_config, k=k, temperature=temperature, chunks=chunks)
    topk = jax.jit(fn if mesh is None else with_rules(fn, mesh, rules))
    written = 0
    for step, batch in tqdm(batches, total=total, desc="teacher top-k", disable=process != 0):
        if dump.path(step, process).is_file():
            continue
        ids, logps = topk(teacher_params, batch=batch)
        dump.write(step, process, local_rows(ids), local_rows(logps))
        written += 1
    return written
