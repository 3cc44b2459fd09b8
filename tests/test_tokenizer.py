"""Tokenizer: Meta's vectors, id-equality with llama-models and HF tokenizers, streaming, guards."""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path

import pytest
from llama3_assets import ASSETS, meta_tokenizer_path

from llama_jax.tokenizer import (
    SPECIAL_TOKEN_NAMES,
    StreamingDetokenizer,
    Tokenizer,
    find_tokenizer,
)

MODEL = meta_tokenizer_path()
pytestmark = pytest.mark.skipif(
    MODEL is None, reason="Meta's tokenizer.model not in ../shared/assets/llama3 nor llama_models"
)

TEXTS = [
    "",
    "hello world",
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog. I'LL say it's DON'T-worry, we've they'd.",
    "我们的模型在多语言文本上表现良好。今天天气很好！",
    "Blåbærsyltetøy er godt på vafler. Ærlig talt, øl og ål på Ålesund.",
    "naïve café 日本語 한국어 русский العربية हिन्दी ελληνικά",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇳🇴🇨🇳 ❤️‍🔥 and text",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nif __name__ == '__main__':\n    print(f(3))",
    "1234567 3.14159 -0.0001 1e10 0x1F 1,000,000 2024-07-23T12:00:00Z",
    "   leading spaces and trailing   ",
    " " * 1000 + "x" + "\t" * 300 + "\r\n" * 50 + "\n\n\n",
    "a\u00a0b\u2003c\u3000d\u200be",
    "<|eot_id|>",
    "<|begin_of_text|>hi<|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "<|eot_id <|reserved_special_token_99|> <|not_a_token|> <|image|><|python_tag|>",
    "ctrl \x00\x01\x7f chars and ﬁ ligature ＡＢＣ fullwidth",
    "x" * 3000,
]


def _random_texts(n: int, seed: int) -> list[str]:
    """Random strings over a mixed alphabet (letters, CJK, emoji, digits, whitespace, marks)."""
    rng = random.Random(seed)
    alphabet = [*"aZ éøå中文字😀🏽\u200d0129 \t\n\r.,'!?<|>_-", "'s", "'LL", "<|eot_id|>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def ref():
    from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    return RefTokenizer(MODEL)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    """A Llama 3 tokenizer.json written by transformers' TikTokenConverter from tokenizer.model."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    converter = TikTokenConverter(vocab_file=str(MODEL), extra_special_tokens=SPECIAL_TOKEN_NAMES)
    converter.converted().save(str(path))
    return path


@pytest.fixture(scope="module")
def from_json(hf_json: Path) -> Tokenizer:
    return Tokenizer(hf_json)


@pytest.fixture(scope="module")
def hf_tokenizers(hf_json: Path):
    """The `tokenizers` library's own reading of the same tokenizer.json (the HF oracle)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(hf_json))


def test_meta_test_vectors(tok: Tokenizer) -> None:
    vectors_file = ASSETS / "test_vectors.json"
    if not vectors_file.is_file():
        pytest.skip(f"{vectors_file} not found")
    vectors = json.loads(vectors_file.read_text())
    meta = vectors["meta_tests"]
    sentence = "encode('This is a test sentence.', bos=True, eos=True)"
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == meta[sentence]
    assert tok.decode(meta[sentence]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )
    for text, ids in vectors["computed_plain_encode_no_bos"].items():
        assert tok.encode(text) == ids, text
    for text, ids in vectors["computed_special_allowed"].items():
        assert tok.encode(text, allowed_special="all") == ids, text
    for name, token_id in vectors["special_tokens_llama_models"].items():
        assert tok.special_tokens[name] == token_id
    assert tok.n_words == vectors["n_vocab"] == 128256


def test_special_token_layout(tok: Tokenizer) -> None:
    assert len(tok.special_tokens) == 256
    assert tok.special_tokens["<|reserved_special_token_2|>"] == 128012
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert (tok.start_header_id, tok.end_header_id) == (128006, 128007)
    assert (tok.eom_id, tok.eot_id, tok.python_tag_id, tok.image_id) == (
        128008,
        128009,
        128010,
        128011,
    )
    assert set(tok.stop_tokens) == {128001, 128008, 128009}
    assert tok.decode([tok.eot_id, tok.python_tag_id]) == "<|eot_id|><|python_tag|>"


def test_special_text_is_plain_unless_allowed(tok: Tokenizer) -> None:
    assert tok.encode("<|eot_id|>") == [27, 91, 68, 354, 851, 91, 29]
    assert tok.encode("<|eot_id|>", allowed_special="all") == [128009]
    assert tok.encode("a<|eot_id|><|eom_id|>", allowed_special={"<|eom_id|>"}) == [
        *tok.encode("a<|eot_id|>"),
        128008,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + _random_texts(150, seed=0))
def test_ids_match_llama_models(tok: Tokenizer, ref, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == ref.encode(text, bos=True, eos=True)
    assert tok.encode(text, allowed_special="all") == ref.encode(
        text, bos=False, eos=False, allowed_special="all"
    )
    assert tok.decode(ids[1:-1]) == text


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        " " * 25_000 + "a",
        " " * 25_001 + "a",
        "b" + "\n" * 50_002,
        "x" * 25_000 + " " + "y" * 25_001,
        "z" * 75_003,
        "word " * 80_001,  # crosses the 400k-character chunk boundary
        "ab " * 133_333 + "c" * 30_000,  # a long run straddling the chunk boundary
    ],
    ids=["ws25000", "ws25001", "nl50002", "mixed", "nonws75003", "chunks", "straddle"],
)
def test_long_input_guards_match_llama_models(tok: Tokenizer, ref, text: str) -> None:
    assert tok.encode(text) == ref.encode(text, bos=False, eos=False)


def test_10mb_input_bounded_time_and_memory(tok: Tokenizer) -> None:
    block = "".join(TEXTS[1:11]) + " " * 30_000 + "q" * 30_000
    text = (block * (10_000_000 // len(block) + 1))[:10_000_000]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert seconds < 30, f"10 MB encode took {seconds:.1f} s"
    assert grown_mb < 500, f"10 MB encode grew peak RSS by {grown_mb:.0f} MB"
    assert tok.decode(ids) == text
    assert 2_000_000 < len(ids) < 4_000_000


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + _random_texts(60, seed=1))
def test_tokenizer_json_matches_model_and_hf_tokenizers(
    tok: Tokenizer, from_json: Tokenizer, hf_tokenizers, text: str
) -> None:
    assert from_json.encode(text) == tok.encode(text)
    # HF always splits out added special tokens, i.e. our allowed_special="all".
    hf_ids = hf_tokenizers.encode(text, add_special_tokens=False).ids
    assert (
        from_json.encode(text, allowed_special="all")
        == hf_ids
        == tok.encode(text, allowed_special="all")
    )


def test_tokenizer_json_special_tokens(tok: Tokenizer, from_json: Tokenizer) -> None:
    assert from_json.special_tokens == tok.special_tokens
    assert from_json.n_words == 128256
    assert from_json.stop_tokens == tok.stop_tokens
    assert from_json.decode(list(range(127990, 128020))) == tok.decode(range(127990, 128020))


def test_find_tokenizer_search_order(tmp_path: Path, hf_json: Path) -> None:
    assert find_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").symlink_to(hf_json)
    assert find_tokenizer(tmp_path).path == tmp_path / "tokenizer.json"
    (tmp_path / "original").mkdir()
    (tmp_path / "original/tokenizer.model").symlink_to(MODEL)
    assert find_tokenizer(tmp_path).path == tmp_path / "original/tokenizer.model"
    (tmp_path / "tokenizer.model").symlink_to(MODEL)
    found = find_tokenizer(tmp_path)
    assert found.path == tmp_path / "tokenizer.model"
    assert found.encode("hello world") == [15339, 1917]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("tokenizer.model", "aGVsbG8= 0\nnot-a-line\n", r"tokenizer\.model:2: expected tiktoken"),
        ("tokenizer.model", "IQ== 0\nIg== 5\n", r"expected BPE ranks to be exactly 0\.\.1"),
        ("tokenizer.model", "", "no BPE tokens found"),
        ("tokenizer.model", "▁hello -1.0\n", "found non-ASCII bytes"),
        ("tokenizer.json", "{not json", "expected an HF tokenizer.json"),
        (
            "tokenizer.json",
            '{"model": {"type": "Unigram", "vocab": {}}}',
            "expected a byte-level BPE",
        ),
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": {"!": 0}}, "added_tokens": []}',
            r"expected added token <\|begin_of_text\|> with id 1",
        ),
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": {"!": 0}}, "pre_tokenizer": '
            '{"type": "Split", "pattern": {"Regex": "\\\\s+"}}}',
            "expected the Llama 3 pre-tokenizer pattern",
        ),
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": {"!": 0}}, "added_tokens": [{"id": 1}]}',
            "expected added_tokens entries with content and id",
        ),
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": {"\\u3042": 0}}}',
            "expected vocab keys in GPT-2 byte-level alphabet",
        ),
    ],
)
def test_malformed_files_name_the_path(tmp_path: Path, name: str, content: str, expected: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected) as err:
        Tokenizer(path)
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as err:
        Tokenizer(tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in str(err.value)


def _byte_split_ids(tok: Tokenizer, data: bytes, rng: random.Random) -> list[int]:
    """Ids covering `data` in random byte chunks, so tokens often end inside a character."""
    ids, pos = [], 0
    while pos < len(data):
        piece = data[pos : pos + rng.randint(1, 4)]
        try:
            ids.append(tok.encoding.encode_single_token(piece))
        except KeyError:
            ids += _byte_ids(tok, piece)
        pos += len(piece)
    return ids


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte (every byte is a token in a byte-level BPE)."""
    return [tok.encoding.encode_single_token(bytes([b])) for b in data]


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    return [detok.add(token_id) for token_id in ids] + [detok.finish()]


@pytest.mark.parametrize("seed", range(20))
def test_streaming_round_trips_random_byte_splits(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.sample(TEXTS[3:9], 4))
    ids = _byte_split_ids(tok, text.encode(), rng)
    assert tok.decode(ids) == text
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[-1] == ""


def test_streaming_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "a😀b".encode())
    assert _stream(tok, ids) == ["a", "", "", "", "😀", "b", ""]


def test_streaming_equals_decode_on_real_and_invalid_ids(tok: Tokenizer) -> None:
    real = tok.encode("".join(TEXTS[1:11]) + "<|eot_id|>", allowed_special="all")
    assert "".join(_stream(tok, real)) == tok.decode(real)
    # A stray continuation byte and a truncated character decode to U+FFFD, as decode() does.
    broken = _byte_ids(tok, b"\x80x\xe4\xb8")
    assert "".join(_stream(tok, broken)) == tok.decode(broken) == "\ufffdx\ufffd"
