"""Documents -> token streams -> fixed-length packed rows, with a grain pipeline.

Sources: text files (one file is one document), JSONL with `{"text": ...}` per line, chat JSONL
with `{"messages": [...]}` per line, prompt-completion JSONL (TRL's format) with `{"prompt": ...,
"completion": ...}` per line, or the built-in corpus `builtin:arithmetic`. Each document becomes
`<|begin_of_text|> ... ` ids; text and prompt-completion documents also end in `<|end_of_text|>`
(chat documents end in their own eot). A prompt-completion document is the prompt's ids then
the completion's, with no chat template, as `python -m llama_jax.post rejection-sample` writes
completions of plain prompts.

A document of n ids gives n-1 (input, target) pairs, so no target ever crosses into the next
document. Documents longer than a row are cut into row-sized pieces. Pieces are first-fit packed
into rows (grain `FirstFitPackIterDataset`) with per-token `positions` restarting at 0 for each
piece and `segment_ids` 1, 2, ... per piece (0 = padding), which the model turns into a
block-diagonal causal mask: attention never crosses a document, as in Llama 3's training.

Order is a function of the seed alone (grain's index shuffle, reseeded per epoch) and every data
shard (the processes feeding one block of batch rows) reads its own slice of the documents. The pipeline's iterator state is saved in each checkpoint.

A document that cannot be read (malformed JSON, invalid UTF-8, neither text nor messages) stops
the run with its FILE:LINE (`bad_data: fail`), or with `bad_data: skip` becomes None, which
grain's iterators pass over: the order stays a function of the seed and the iterator state a
position, so a resumed run skips the same documents. Skips are logged once per bad line and
counted in `SKIPPED` (the metrics' `skipped_documents`).
"""

from __future__ import annotations

import glob
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llama_jax.chat import encode_dialog_with_mask
from train import corpus

BUILTIN = "builtin:arithmetic"  # the synthetic corpus of train/corpus.py
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
Example = dict[str, np.ndarray]
# Packed per-token features; `positions` and `segment_ids` come from the packer.
PACKED_KEYS = ("tokens", "targets", "loss_mask")
BAD_DATA = ("fail", "skip")
DOCUMENT_KEYS = {"text", "messages", "prompt", "completion"}  # a JSONL document has one kind


class DataError(ValueError):
    """A data file or document that is not what the pipeline reads."""


@dataclass(frozen=True)
class DataConfig:
    """Data settings. `batch` is the global number of rows per step (split over hosts);
    `packing_bins` is how many rows are filled at once (0: one host batch). `read_threads` > 0
    reads and tokenizes documents in background threads, which pays off only when documents
    come from slow storage: otherwise the main thread keeps ahead of the device (the step is
    dispatched asynchronously) and threads only add GIL contention. `bad_data`: what an
    unreadable document does, "fail" (stop the run, naming its FILE:LINE) or "skip" (see the
    module docstring)."""

    paths: tuple[str, ...] = ()
    seq_len: int = 2048
    batch: int = 8
    sft: bool = False
    tokenizer: str = "llama3"
    packing_bins: int = 0
    read_threads: int = 0
    bad_data: str = "fail"


# --- documents -------------------------------------------------------------------------------


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Files named by `paths`: files, directories (their text/JSONL files, recursively) or globs,
    in a fixed (sorted) order."""
    if not paths:
        raise DataError(
            "--data: no training data given (--data PATH... or data.paths in the config)"
        )
    files: list[Path] = []
    for raw in paths:
        matches = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise DataError(f"--data {raw}: no file matches")
        for match in map(Path, matches):
            if match.is_dir():
                suffixes = JSONL_SUFFIXES + TEXT_SUFFIXES
                files += sorted(p for p in match.rglob("*") if p.suffix in suffixes)
            elif match.is_file():
                files.append(match)
            else:
                raise DataError(f"--data {match}: no such file or directory")
    if not files:
        raise DataError(f"--data {' '.join(paths)}: no .txt/.md/.jsonl files found")
    return files


class DocumentSource:
    """Random access to documents (grain's data-source protocol: `len` and `[i]`).

    JSONL files are indexed by line offsets once at start-up, so a document is read (and parsed)
    only when the pipeline asks for it.
    """

    def __init__(self, paths: Sequence[str]):
        self.files = expand_paths(paths)
        file_ids, offsets, lines = [], [], []
        for i, path in enumerate(self.files):
            if path.suffix not in JSONL_SUFFIXES:
                file_ids.append(i), offsets.append(-1), lines.append(0)
                continue
            offset = 0
            with path.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        file_ids.append(i), offsets.append(offset), lines.append(lineno)
                    offset += len(line)
        if not file_ids:
            raise DataError(f"--data: {len(self.files)} file(s) hold no documents")
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._line = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[self._file[index]]
        if self._offset[index] < 0:
            return {"text": _read_text(path)}
        doc, where = self.json_line(index)
        if not isinstance(doc, dict) or not DOCUMENT_KEYS & doc.keys():
            raise DataError(
                f'{where}: expected {{"text": ...}}, {{"messages": [...]}} or '
                '{"prompt": ..., "completion": ...}'
            )
        return doc

    def where(self, index: int) -> str:
        """FILE:LINE of document `index` (FILE alone for a text file)."""
        path = self.files[self._file[index]]
        return f"{path}:{self._line[index]}" if self._offset[index] >= 0 else str(path)

    def json_line(self, index: int) -> tuple[Any, str]:
        """(the parsed JSONL line of document `index`, its FILE:LINE for errors)."""
        path = self.files[self._file[index]]
        where = self.where(index)
        with path.open("rb") as f:
            f.seek(int(self._offset[index]))
            line = f.readline()
        try:
            return json.loads(line), where
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None


def _read_text(path: Path) -> str:
    """A text file's contents; invalid UTF-8 is a DataError naming the line of the first bad
    byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def open_documents(paths: Sequence[str]) -> Sequence[dict[str, Any]]:
    """The documents of `--data`: files (see `DocumentSource`) or the built-in corpus."""
    if list(paths) == [BUILTIN]:
        return corpus.documents()
    if BUILTIN in paths:
        raise DataError(f"--data {BUILTIN} cannot be mixed with files")
    return DocumentSource(paths)


# --- tokenization and pieces -----------------------------------------------------------------


def tokenize_document(doc: dict[str, Any], tokenizer: Any, sft: bool) -> Example:
    """One document -> {tokens, targets, loss_mask} of length n-1 (inputs, next ids, weights).

    Pretraining counts every target. SFT counts only the targets the chat mask marks (assistant
    bodies and their closing eot/eom) or, for a prompt-completion document, the completion and
    its closing `<|end_of_text|>`; it needs chat or prompt-completion documents.
    """
    if "messages" in doc:
        if not isinstance(doc["messages"], list):
            raise DataError(f'"messages" must be a list, got {type(doc["messages"]).__name__}')
        ids, mask = encode_dialog_with_mask(tokenizer, doc["messages"])
        if not sft:
            mask = [1] * len(ids)
    elif "prompt" in doc or "completion" in doc:
        ids, mask = _prompt_completion(doc, tokenizer)
        if not sft:
            mask = [1] * len(ids)
    elif sft:
        raise DataError(
            '--sft: every document must be chat JSONL {"messages": [...]} or '
            '{"prompt": ..., "completion": ...}'
        )
    elif not isinstance(doc["text"], str):
        raise DataError(f'"text" must be a string, got {type(doc["text"]).__name__}')
    else:
        ids = tokenizer.encode(doc["text"], bos=True, eos=True)
        mask = [1] * len(ids)
    ids_arr = np.asarray(ids, np.int32)
    return {
        "tokens": ids_arr[:-1],
        "targets": ids_arr[1:],
        "loss_mask": np.asarray(mask[1:], np.float32),
    }


def _prompt_completion(doc: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt-completion document: `<|begin_of_text|>` prompt completion
    `<|end_of_text|>`, the mask marking the completion and the eos (what SFT learns to say;
    the prompt is only read)."""
    for name in ("prompt", "completion"):
        if name not in doc:
            raise DataError(f'a prompt-completion document needs "{name}" too')
        if not isinstance(doc[name], str):
            raise DataError(f'"{name}" must be a string, got {type(doc[name]).__name__}')
    prompt = tokenizer.encode(doc["prompt"], bos=True)
    completion = tokenizer.encode(doc["completion"], eos=True)
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


class SkippedDocuments:
    """The documents `bad_data: skip` dropped in this process: `count` of them in all (a bad
    line met again in a later epoch counts again), each bad line logged once.

    Process-wide (`SKIPPED`) because pipelines are built by code that knows nothing of it and
    grain may read documents in its threads; the loop reports the count's increments."""

    def __init__(self) -> None:
        self.count = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, error: DataError) -> None:
        with self._lock:
            self.count += 1
            new = str(error) not in self._seen
            self._seen.add(str(error))
        if new:
            logging.getLogger(__name__).warning("skipping a bad document: %s", error)


SKIPPED = SkippedDocuments()


def _where(documents: Sequence[dict[str, Any]], index: int) -> str:
    return documents.where(index) if isinstance(documents, DocumentSource) else f"document {index}"


def read_example(
    documents: Sequence[dict[str, Any]], index: int, tokenizer: Any, sft: bool, skip: bool
) -> Example | None:
    """Document `index` tokenized; an unreadable one raises a DataError naming its FILE:LINE,
    or with `skip` is counted in `SKIPPED` and gives None."""
    try:
        return _tokenized(documents, index, tokenizer, sft)
    except DataError as e:
        if not skip:
            raise
        SKIPPED.add(e)
        return None


def _tokenized(
    documents: Sequence[dict[str, Any]], index: int, tokenizer: Any, sft: bool
) -> Example:
    doc = documents[index]  # its errors name FILE:LINE already
    try:
        return tokenize_document(doc, tokenizer, sft)
    except DataError as e:
        raise DataError(f"{_where(documents, index)}: {e}") from None


class SplitLong(grain.experimental.FlatMapTransform):
    """Cut an example longer than a row into row-sized pieces (each restarts its positions)."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, example: Example) -> list[Example]:
        n = len(example["tokens"])
        return [
            {k: v[start : start + self.seq_len] for k, v in example.items()}
            for start in range(0, n, self.seq_len)
        ]


def _as_batch(packed: Example) -> dict[str, np.ndarray]:
    """Packer output -> the train step's batch keys and dtypes."""
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "positions": packed["tokens_positions"],
        "segment_ids": packed["tokens_segment_ids"],
        "loss_mask": packed["loss_mask"],
    }


def pack_examples(
    examples: grain.IterDataset, seq_len: int, rows: int, seed: int
) -> grain.IterDataset:
    """Variable-length examples -> packed rows {tokens, targets, positions, segment_ids,
    loss_mask} of length `seq_len`, `rows` rows filled at a time (first fit), rows shuffled."""
    pieces = grain.experimental.FlatMapIterDataset(examples, SplitLong(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={k: seq_len for k in PACKED_KEYS},
        num_packing_bins=rows,
        seed=seed,
        meta_features=("targets", "loss_mask"),
    )
    return packed.map(_as_batch)


def check_shards(cfg: DataConfig, items: int, what: str, shard_count: int) -> None:
    """The global batch must split evenly over the data shards, each of which needs an item."""
    if cfg.batch % shard_count:
        raise DataError(f"--batch {cfg.batch} is not divisible by the {shard_count} data shards")
    if items < shard_count:
        raise DataError(f"--data: {items} {what} for {shard_count} data shards")


def make_dataset(
    documents: Sequence[dict[str, Any]],
    tokenizer: Any,
    cfg: DataConfig,
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """One data shard's endless stream of batches: dict of [batch // shard_count, seq_len]
    arrays (a process feeds the rows of the global batch that its devices hold).

    Documents are split over shards first (shard i reads documents i, i+S, ...), then shuffled
    with `seed` (a new permutation each epoch), read, tokenized, packed and batched.
    """
    check_shards(cfg, len(documents), "documents", shard_count)
    if cfg.bad_data not in BAD_DATA:
        raise DataError(f"--bad-data {cfg.bad_data!r}: expected one of {', '.join(BAD_DATA)}")
    local_batch = cfg.batch // shard_count
    indices = grain.MapDataset.range(len(documents))[shard_index::shard_count]
    skip = cfg.bad_data == "skip"
    examples = (
        indices.shuffle(seed=seed)
        .repeat()
        .map(lambda i: read_example(documents, i, tokenizer, cfg.sft, skip))
        .to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads))
    )
    rows = max(cfg.packing_bins, local_batch)
    return pack_examples(examples, cfg.seq_len, rows, seed).batch(local_batch, drop_remainder=True)
