"""Data pipeline: sources, packing (positions, segments, no cross-document targets), order and
resumption, host sharding, and the SFT loss mask against the Llama 3 chat format."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from llama_jax.tokenizer import ByteTokenizer
from train.data import (
    DataConfig,
    DataError,
    DocumentSource,
    make_dataset,
    pack_examples,
    read_example,
    tokenize_document,
)
from train.tokenizers import load_tokenizer, meta_tokenizer_path

BYTES = ByteTokenizer()


def _docs(n: int) -> list[dict[str, str]]:
    return [{"text": f"doc {i}: " + "x" * (i % 7)} for i in range(n)]


def _take(dataset, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def _segments(row: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    seg = row["segment_ids"]
    return [{k: v[seg == s] for k, v in row.items()} for s in np.unique(seg[seg > 0])]


def test_packed_rows_keep_documents_apart():
    docs = [{"text": "hello world"}, {"text": "ab"}, {"text": "a longer document here"}]
    cfg = DataConfig(seq_len=32, batch=2, tokenizer="bytes")
    batch = _take(make_dataset(docs, BYTES, cfg, seed=0), 1)[0]
    assert batch["tokens"].shape == (2, 32) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    seen = []
    for r in range(2):
        row = {k: v[r] for k, v in batch.items()}
        pad = row["segment_ids"] == 0
        assert not row["loss_mask"][pad].any() and not row["tokens"][pad].any()
        for seg in _segments(row):
            np.testing.assert_array_equal(seg["positions"], np.arange(len(seg["tokens"])))
            ids = [*seg["tokens"], seg["targets"][-1]]  # a piece is ids[:-1] -> ids[1:]
            np.testing.assert_array_equal(seg["targets"][:-1], seg["tokens"][1:])
            assert ids[0] == BYTES.bos_id and ids[-1] == BYTES.eos_id
            seen.append(BYTES.decode(ids[1:-1]))
    assert set(seen) == {d["text"] for d in docs}  # (the endless stream adds the next epoch)


def test_long_documents_are_cut_into_row_sized_pieces():
    text = "0123456789" * 5  # 52 ids with bos/eos -> 51 pairs
    cfg = DataConfig(seq_len=16, batch=4, tokenizer="bytes")
    batch = _take(make_dataset([{"text": text}], BYTES, cfg, seed=0), 1)[0]
    pieces = [s for r in range(4) for s in _segments({k: v[r] for k, v in batch.items()})]
    lengths = sorted(len(p["tokens"]) for p in pieces)
    assert lengths == [3, 16, 16, 16]
    assert all(p["positions"][0] == 0 for p in pieces)


def test_order_is_a_function_of_the_seed_and_resumes_from_state():
    cfg = DataConfig(seq_len=24, batch=2, tokenizer="bytes")
    ds = make_dataset(_docs(40), BYTES, cfg, seed=3)
    first = _take(ds, 6)
    again = _take(make_dataset(_docs(40), BYTES, cfg, seed=3), 6)
    other = _take(make_dataset(_docs(40), BYTES, cfg, seed=4), 6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert any((a["tokens"] != b["tokens"]).any() for a, b in zip(first, other, strict=True))

    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(make_dataset(_docs(40), BYTES, cfg, seed=3))
    resumed.set_state(json.loads(json.dumps(state)))  # as stored in the checkpoint
    for expected in first[3:]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_data_shards_read_disjoint_slices():
    docs = [{"text": f"<{i}>"} for i in range(12)]
    cfg = DataConfig(seq_len=64, batch=2, tokenizer="bytes")
    texts = []
    for host in range(2):
        ds = make_dataset(docs, BYTES, cfg, seed=0, shard_index=host, shard_count=2)
        batch = _take(ds, 1)[0]
        assert batch["tokens"].shape == (1, 64)  # this shard's half of the global batch
        for seg in _segments({k: v[0] for k, v in batch.items()}):
            texts.append((host, BYTES.decode(seg["tokens"][1:])))
    by_host = [{t for h, t in texts if h == host} for host in range(2)]
    assert not by_host[0] & by_host[1]
    assert {int(t[1:-1]) % 2 for t in by_host[0]} == {0}


def test_sources_read_text_jsonl_dirs_and_name_bad_lines(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        '{"text": "one"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    src = DocumentSource([str(tmp_path)])
    assert len(src) == 3
    assert src[0] == {"text": "plain text document"}
    assert src[2]["messages"][0]["content"] == "hi"

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        DocumentSource([str(tmp_path / "bad.jsonl")])[1]
    with pytest.raises(DataError, match="no such file"):
        DocumentSource([str(tmp_path / "missing.jsonl")])


DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, since 3+3=6."},
]


def _chat_text(messages: list[dict[str, str]]) -> str:
    """The Llama 3 chat format written out by hand."""
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        for m in messages
    )
    return "<|begin_of_text|>" + turns


def _tokenizers() -> list:
    meta = meta_tokenizer_path()
    skip = pytest.mark.skipif(meta is None, reason="llama_models (Meta's tokenizer) not installed")
    return [
        pytest.param(BYTES, id="bytes"),
        pytest.param(load_tokenizer("llama3") if meta else None, id="llama3", marks=skip),
    ]


@pytest.mark.parametrize("tokenizer", _tokenizers())
def test_sft_counts_only_assistant_tokens(tokenizer):
    example = tokenize_document({"messages": DIALOG}, tokenizer, sft=True)
    ids = tokenizer.encode(_chat_text(DIALOG), allowed_special="all")
    np.testing.assert_array_equal(example["tokens"], ids[:-1])
    np.testing.assert_array_equal(example["targets"], ids[1:])

    # The counted targets are exactly each assistant reply followed by its <|eot_id|>.
    counted = example["targets"][example["loss_mask"] == 1]
    replies = [m["content"] for m in DIALOG if m["role"] == "assistant"]
    assert tokenizer.decode(counted) == "".join(r + "<|eot_id|>" for r in replies)
    # ... and they come in contiguous runs, one per reply, each ending at an eot.
    runs = np.split(counted, np.cumsum([len(tokenizer.encode(r)) + 1 for r in replies])[:-1])
    assert [tokenizer.decode(r) for r in runs] == [r + "<|eot_id|>" for r in replies]

    packed = pack_examples(
        grain.MapDataset.source([example]).to_iter_dataset(), seq_len=128, rows=1, seed=0
    )
    row = next(iter(packed))
    assert row["loss_mask"].sum() == len(counted)


def test_pretraining_counts_every_token_and_sft_needs_chats():
    chat = tokenize_document({"messages": DIALOG}, BYTES, sft=False)
    assert chat["loss_mask"].all()
    with pytest.raises(DataError, match="--sft"):
        tokenize_document({"text": "plain"}, BYTES, sft=True)


@pytest.mark.parametrize("tokenizer", _tokenizers())
def test_prompt_completion_counts_the_completion_and_its_eos(tokenizer):
    """TRL's prompt-completion format: bos, prompt, completion, eos, no chat template; under
    --sft only the completion's ids and the eos are targets that count."""
    example = tokenize_document({"prompt": "7+8=", "completion": "15"}, tokenizer, sft=True)
    prompt, completion = tokenizer.encode("7+8="), tokenizer.encode("15")
    ids = [tokenizer.bos_id, *prompt, *completion, tokenizer.eos_id]
    np.testing.assert_array_equal(example["tokens"], ids[:-1])
    np.testing.assert_array_equal(example["targets"], ids[1:])
    want = [0] * len(prompt) + [1] * (len(completion) + 1)
    np.testing.assert_array_equal(example["loss_mask"], want)
    assert tokenizer.decode(example["targets"][example["loss_mask"] == 1]) == "15<|end_of_text|>"
    pretrain = tokenize_document({"prompt": "7+8=", "completion": "15"}, tokenizer, sft=False)
    np.testing.assert_array_equal(pretrain["targets"], ids[1:])
    assert pretrain["loss_mask"].all()


def test_prompt_completion_reads_from_jsonl_and_names_bad_lines(tmp_path: Path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    src = DocumentSource([str(path)])
    example = read_example(src, 0, BYTES, sft=True, skip=False)
    assert BYTES.decode(example["targets"][example["loss_mask"] == 1]) == "2<|end_of_text|>"
    with pytest.raises(DataError, match=r'sft.jsonl:2: a prompt-completion document needs "comp'):
        read_example(src, 1, BYTES, sft=True, skip=False)
    with pytest.raises(DataError, match=r'^document 0: "completion" must be a string, got int$'):
        read_example([{"prompt": "a", "completion": 3}], 0, BYTES, sft=True, skip=False)
