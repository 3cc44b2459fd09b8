"""SentencePiece tokenizers: stories260K's tok512.model against the sentencepiece package itself,
streaming, telling files apart, and the CLI generating text with it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from infer.cli import main
from llama_jax.chat import encode_dialog
from llama_jax.sentencepiece_tokenizer import SentencePieceTokenizer
from llama_jax.tokenizer import default_stop_ids, find_tokenizer, open_tokenizer
from llama_jax.tokenizer_base import TokenizerError

spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "",
    "Once upon a time",
    " leading space",
    "   leading and trailing spaces   ",
    "two  spaces\tand a tab",
    "Lily's mom said, \"Don't worry!\"\nThe end.",
    "héllo 日本語 😀 👨‍👩‍👧",  # characters outside the 512 pieces: byte fallback
    "ctrl \x00\x01\x7f chars",
    "<s> and </s> stay text",
    "▁ is a space marker",
]


@pytest.fixture(scope="module")
def stories(shared_assets) -> Path:
    return shared_assets / "stories260K"


@pytest.fixture(scope="module")
def model_file(stories) -> Path:
    return stories / "tok512.model"


@pytest.fixture(scope="module")
def tok(model_file) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_file)


@pytest.fixture(scope="module")
def ref(model_file):
    return spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_match_sentencepiece(tok, ref, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert tok.decode(ids) == ref.decode(ids)
    # Encoding drops extra whitespace and reads '▁' as a space: other text comes back as is.
    if text == " ".join(text.split()) and "▁" not in text:
        assert tok.decode(ids) == text


def test_known_ids_and_special_tokens(tok) -> None:
    assert tok.encode("Once upon a time", bos=True) == [1, 403, 407, 261, 378]
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.stop_tokens) == (512, 1, 2, (2,))
    assert default_stop_ids(tok, 512) == (2,)
    assert tok.decode([1, 403, 2]) == "Once"  # control tokens are invisible
    assert [tok.token_bytes(i) for i in (403, 3 + 0xE6, 1)] == [b" Once", b"\xe6", b""]


def _stream(tok, ids: list[int]) -> str:
    detok = tok.detokenizer()
    return "".join([detok.add(i) for i in ids] + [detok.finish()])


def _random_ids(rng: random.Random, vocab: int) -> list[int]:
    """Ids that exercise the decoder: unk, BOS/EOS, lone '▁', partial and stray UTF-8 bytes."""
    tricky = [0, 1, 2, 410, 3 + 0x20, 3 + 0xE6, 3 + 0x97, 3 + 0xA5, 3 + 0x80, 3 + 0xFF, 403, 13]
    return [
        rng.choice(tricky) if rng.random() < 0.6 else rng.randrange(vocab)
        for _ in range(rng.randint(0, 12))
    ]


def _llama2_style(model_file: Path, tmp_path: Path) -> Path:
    """tok512 with Llama 2's normaliser setting (extra whitespace kept), which changes how the
    decoder drops the dummy-prefix space at the start."""
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = False
    path = tmp_path / "llama2_style.model"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("variant", ["tok512", "llama2_style"])
def test_streaming_equals_sentencepiece_decode(model_file, tmp_path, variant: str) -> None:
    path = model_file if variant == "tok512" else _llama2_style(model_file, tmp_path)
    tok, ref = SentencePieceTokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    rng = random.Random(0)
    for _ in range(2000):
        ids = _random_ids(rng, tok.n_words)
        assert _stream(tok, ids) == ref.decode(ids) == tok.decode(ids), ids
    assert _stream(tok, tok.encode("  two  spaces")) == ref.decode(ref.encode("  two  spaces"))


def test_streaming_holds_back_partial_characters(tok) -> None:
    detok = tok.detokenizer()
    ids = tok.encode("a😀")  # '▁a' then four byte pieces
    assert [detok.add(i) for i in ids] + [detok.finish()] == ["a", "", "", "", "😀", ""]


def test_streams_the_known_story(tok, stories) -> None:
    expected = json.loads((stories / "expected" / "greedy_from_bos.json").read_text())
    assert _stream(tok, expected["tokens"][1:]) == expected["text"]


def test_files_are_told_apart_by_content(tok, model_file, tmp_path) -> None:
    assert isinstance(open_tokenizer(model_file), SentencePieceTokenizer)
    (tmp_path / "tokenizer.model").symlink_to(model_file)  # Llama 2 ships it under this name
    found = find_tokenizer(tmp_path)
    assert isinstance(found, SentencePieceTokenizer) and found.encode("Once") == [403]


def test_broken_model_is_one_line(tmp_path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x05\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="expected a SentencePiece model protobuf") as err:
        open_tokenizer(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_package_says_how_to_install(model_file, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` fails
    with pytest.raises(TokenizerError) as err:
        open_tokenizer(model_file)
    message = str(err.value)
    assert "pip install 'llama-jax[sentencepiece]'" in message and str(model_file) in message
    assert "\n" not in message


def test_chat_format_refuses_sentencepiece(tok) -> None:
    with pytest.raises(ValueError, match="chat needs a Llama 3 tokenizer"):
        encode_dialog(tok, [{"role": "user", "content": "hi"}])


def test_cli_prints_a_story(stories) -> None:
    cmd = [sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(stories / "hf"),
           "--tokenizer", str(stories / "tok512.model"), "--prompt", "Once upon a time",
           "--max-new-tokens", "8"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ", there was a little girl\n"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_says_why_text_is_absent(stories, capsys) -> None:
    ckpt = stories / "hf"
    code, out, err = run(capsys, "--checkpoint", ckpt, "--prompt-ids", 1, "--max-new-tokens", 4,
                         "--json", "--max-seq-len", 64)  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] is None and "--tokenizer" in result["note"]
    code, out, err = run(capsys, "--checkpoint", ckpt, "--tokenizer", stories / "tok512.model",
                         "--prompt-ids", 1, "--max-new-tokens", 4, "--json", "--max-seq-len", 64)  # fmt: skip
    result = json.loads(out)
    assert result["text"] == "Once upon a time" and "note" not in result


@pytest.mark.parametrize("mode", ["--chat", "--file"])
def test_chat_with_sentencepiece_is_one_line(stories, capsys, tmp_path, mode: str) -> None:
    jobs = tmp_path / "chat.jsonl"
    jobs.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    args = ["--chat"] if mode == "--chat" else ["--file", jobs]
    code, _, err = run(capsys, "--checkpoint", stories / "hf", "--tokenizer",
                       stories / "tok512.model", *args)  # fmt: skip
    assert code == 2
    assert err.startswith("llama_jax.infer: error: ") and err.count("\n") == 1
    assert "chat needs a Llama 3 tokenizer" in err and "tok512.model" in err
