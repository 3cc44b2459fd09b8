"""Preference pairs (DPO) -> packed rows in which the chosen and rejected sequence of a pair
sit side by side, so one forward pass scores both.

A JSONL line holds a prompt (`"prompt": text`, or a chat as `"messages"` or TRL's
conversational `"prompt": [messages]`) and two completions, `chosen` and `rejected` (text, or
TRL's list of assistant messages). A chat prompt ends in an open assistant header and a text
completion after it closes its turn with `<|eot_id|>`; after a text prompt it ends with
`<|end_of_text|>`. Lines may carry `ref_chosen_logps` / `ref_rejected_logps` (written by
`train.dpo.reference_logps`), the reference model's log-prob sums of the two completions.

A pair becomes one example: prompt+chosen, then prompt+rejected, each half with positions from
0 and its own attention segment. Pairs are first-fit packed into rows (grain
`FirstFitPackIterDataset`); per-pair quantities are segment sums over the row (`per_pair_sums`).
Batch keys, [rows, seq_len]: tokens, targets, positions, segment_ids (pair k's chosen half is
segment 2k-1, its rejected half 2k, 0 = padding), loss_mask (float32, 1 on completion
targets), pair_ids (k, 0 = padding), rejected (1 on the rejected half), truncated (1 on the
first token of a pair that was cut to fit) and, when the data carries them, ref_logps (float32:
each half's reference sum on its first completion target, 0 elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.chat import encode_dialog, encode_dialog_with_mask
from train.data import (
    JSONL_SUFFIXES,
    SKIPPED,
    DataConfig,
    DataError,
    DocumentSource,
    Example,
    check_shards,
)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
# Per-token features of a pair example; the packer adds segment ids and positions for `tokens`.
PAIR_KEYS = ("tokens", "targets", "loss_mask", "own_positions", "rejected", "truncated")
WHERE = "_where"  # the FILE:LINE a document came from, for errors raised after reading


class PreferenceSource(DocumentSource):
    """Random access to the preference lines of JSONL files, checked when read."""

    def __init__(self, paths: Sequence[str]):
        super().__init__(paths)
        texts = [str(p) for p in self.files if p.suffix not in JSONL_SUFFIXES]
        if texts:
            raise DataError(f"{texts[0]}: preference data must be JSONL (one pair per line)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        doc, where = self.json_line(index)
        check_pair(doc, where)
        return {**doc, WHERE: where}


def check_pair(doc: Any, where: str) -> None:
    """Raise DataError naming `where` and the missing key unless `doc` is a preference pair."""
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with prompt, chosen and rejected")
    if "prompt" not in doc and "messages" not in doc:
        raise DataError(f"{where}: no 'prompt' (or 'messages') key in the preference line")
    for key in ("chosen", "rejected"):
        if key not in doc:
            raise DataError(f"{where}: no '{key}' key in the preference line")


# --- tokenization ----------------------------------------------------------------------------


def _chat_prompt(doc: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The prompt as chat messages, or None for a text prompt."""
    prompt = doc.get("messages", doc.get("prompt"))
    return None if isinstance(prompt, str) else list(prompt)


def _completion(
    tokenizer: Any, chat: list[dict[str, Any]] | None, completion: Any, n_prompt: int, where: str
) -> tuple[list[int], list[int]]:
    """(ids, 0/1 learn mask) of one completion after the prompt."""
    if not isinstance(completion, (str, list)):
        raise DataError(f"{where}: a completion must be text or a list of assistant messages")
    if chat is None:
        if not isinstance(completion, str):
            raise DataError(f"{where}: a text prompt needs text completions")
        ids = [*tokenizer.encode(completion), tokenizer.eos_id]
        return ids, [1] * len(ids)
    turns = (
        [{"role": "assistant", "content": completion}]
        if isinstance(completion, str)
        else completion
    )
    try:
        ids, mask = encode_dialog_with_mask(tokenizer, chat + list(turns))
    except (ValueError, TypeError, AttributeError) as e:  # a message that is not a chat turn
        raise DataError(f"{where}: {e}") from None
    return ids[n_prompt:], mask[n_prompt:]


def tokenize_pair(doc: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A preference line -> {prompt, chosen, rejected: ids; chosen_mask, rejected_mask;
    ref: (chosen, rejected) sums or None}."""
    where = doc.get(WHERE, "<pair>")
    chat = _chat_prompt(doc)
    prompt = (
        tokenizer.encode(doc["prompt"], bos=True)
        if chat is None
        else encode_dialog(tokenizer, chat, add_generation_prompt=True)
    )
    out: dict[str, Any] = {"prompt": prompt, "where": where}
    for key in ("chosen", "rejected"):
        out[key], out[f"{key}_mask"] = _completion(tokenizer, chat, doc[key], len(prompt), where)
    out["ref"] = tuple(float(doc[k]) for k in REF_KEYS) if REF_KEYS[0] in doc else None
    return out


def fit_lengths(
    n_prompt: int, n_chosen: int, n_rejected: int, seq_len: int
) -> tuple[int, int, int]:
    """(prompt kept from its end, chosen kept, rejected kept) so that the pair's two halves,
    of n_prompt + n_completion - 1 positions each, fit a row of `seq_len`.

    Completions are cut from the end first, the longer one before the shorter (both keep the
    same number of ids once cut); only when a prompt leaves no room for one id of each
    completion is the prompt cut, from its beginning, like TRL's `truncation_mode="keep_end"`.
    """
    budget = seq_len + 2 - 2 * n_prompt  # ids left for the two completions together
    if n_chosen + n_rejected <= budget:
        return n_prompt, n_chosen, n_rejected
    if budget < 2:
        return seq_len // 2, 1, 1
    short = min(n_chosen, n_rejected)
    cap = budget // 2 if short > budget // 2 else budget - short
    return n_prompt, min(n_chosen, cap), min(n_rejected, cap)


def _half(prompt: list[int], ids: list[int], mask: list[int], ref: float | None) -> Example:
    """One sequence of a pair: prompt + completion as (inputs, next ids, weights, positions),
    plus the reference sum on its first completion target when the line has one."""
    full = np.asarray(prompt + ids, np.int32)
    weights = np.asarray([0] * len(prompt) + mask, np.float32)[1:]
    half = {
        "tokens": full[:-1],
        "targets": full[1:],
        "loss_mask": weights,
        "own_positions": np.arange(len(full) - 1, dtype=np.int32),
    }
    if ref is not None:
        half["ref_logps"] = np.zeros_like(weights)
        half["ref_logps"][np.argmax(weights > 0)] = ref
    return half


def pair_example(pair: dict[str, Any], seq_len: int) -> Example:
    """A tokenized pair -> one example of both halves (chosen first), cut to fit `seq_len`."""
    lengths = (len(pair["prompt"]), len(pair["chosen"]), len(pair["rejected"]))
    kept = fit_lengths(*lengths, seq_len)
    prompt = pair["prompt"][lengths[0] - kept[0] :]
    refs = pair["ref"] or (None, None)
    halves = [
        _half(prompt, pair[key][:n], pair[f"{key}_mask"][:n], ref)
        for key, n, ref in zip(("chosen", "rejected"), kept[1:], refs, strict=True)
    ]
    example = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    example["rejected"] = np.repeat(np.int32([0, 1]), [len(h["tokens"]) for h in halves])
    example["truncated"] = np.zeros_like(example["rejected"])
    example["truncated"][0] = kept != lengths
    return example


# --- packing ---------------------------------------------------------------------------------


def _as_batch(packed: Example) -> dict[str, np.ndarray]:
    """Packer output -> the DPO batch keys: attention segments split each pair in two halves."""
    pair_ids = packed["tokens_segment_ids"].astype(np.int32)
    rejected = packed["rejected"].astype(np.int32)
    batch = {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "positions": packed["own_positions"].astype(np.int32),
        "segment_ids": np.where(pair_ids > 0, 2 * pair_ids - 1 + rejected, 0).astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.float32),
        "pair_ids": pair_ids,
        "rejected": rejected,
        "truncated": packed["truncated"].astype(np.int32),
    }
    if "ref_logps" in packed:
        batch["ref_logps"] = packed["ref_logps"].astype(np.float32)
    return batch


def _checked_ref(example: Example, with_ref: bool, where: str) -> Example:
    """Every line carries reference sums or none does: the batch keys must not vary."""
    if ("ref_logps" in example) != with_ref:
        state = "lacks" if with_ref else "has"
        raise DataError(f"{where}: {state} {'/'.join(REF_KEYS)}, unlike the first line")
    return example


def make_preference_dataset(
    paths: Sequence[str],
    tokenizer: Any,
    cfg: DataConfig,
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """One data shard's endless stream of packed preference batches (see the module doc):
    dict of [batch // shard_count, seq_len] arrays. Mirrors `train.data.make_dataset`: lines
    split over shards, shuffled per epoch with `seed`, tokenized, first-fit packed, batched;
    the iterator is a grain dataset, so its state checkpoints and resumes exactly."""
    source = PreferenceSource(paths)
    check_shards(cfg, len(source), "preference pairs", shard_count)
    with_ref = REF_KEYS[0] in source[0]
    local_batch = cfg.batch // shard_count
    skip = cfg.bad_data == "skip"

    def example(index: int) -> Example | None:
        """Pair `index` packed; a bad line raises, or with `bad_data: skip` is counted in
        `SKIPPED` and gives None (which grain passes over), as `train.data` does."""
        try:
            pair = tokenize_pair(source[index], tokenizer)
            return _checked_ref(pair_example(pair, cfg.seq_len), with_ref, pair["where"])
        except DataError as e:
            if not skip:
                raise
            SKIPPED.add(e)
            return None

    examples = (
        grain.MapDataset.range(len(source))[shard_index::shard_count]
        .shuffle(seed=seed)
        .repeat()
        .map(example)
        .to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads))
    )
    keys = PAIR_KEYS + (("ref_logps",) if with_ref else ())
    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={k: cfg.seq_len for k in keys},
        num_packing_bins=max(cfg.packing_bins, local_batch),
        seed=seed,
        meta_features=tuple(k for k in keys if k != "tokens"),
    )
    return packed.map(_as_batch).batch(local_batch, drop_remainder=True)


# --- per-pair reductions ---------------------------------------------------------------------


def max_pairs(seq_len: int) -> int:
    """The most pairs a row can hold: the shortest pair (a one-id prompt, one id per
    completion) spans two positions."""
    return seq_len // 2


def segment_sums(values: jax.Array, segment_ids: jax.Array, pairs: int) -> jax.Array:
    """Per-row sums of `values` [B, T] over each attention segment -> [B, 2 * pairs + 1]
    (column 0 = padding). A row-wise scatter-add: jit- and sharding-friendly."""

    def row_sums(v: jax.Array, s: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(v, s, num_segments=2 * pairs + 1)

    return jax.vmap(row_sums)(values, segment_ids)


def split_halves(sums: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Segment sums [B, 2P + 1] -> (chosen [B, P], rejected [B, P])."""
    return sums[:, 1::2], sums[:, 2::2]


def per_pair_sums(
    values: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, valid), each [B, P]: the sums of per-token `values` over each pair's
    chosen and rejected half, and 1.0 where pair slot k of a row holds a pair."""
    pairs = max_pairs(values.shape[1])
    chosen, rejected = split_halves(segment_sums(values, batch["segment_ids"], pairs))
    counts = segment_sums(batch["loss_mask"].astype(jnp.float32), batch["segment_ids"], pairs)
    return chosen, rejected, (split_halves(counts)[0] > 0).astype(jnp.float32)
