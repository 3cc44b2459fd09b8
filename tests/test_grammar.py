"""response_format by grammar-constrained decoding: masks, the jitted mask, validation.

Sampling loops here stand in for the engine: random logits over the real Llama 3 vocabulary,
masked by `apply_bitmask`, sampled, fed back to the `Constraint`. Whatever the logits, every
finished output must parse and satisfy its schema.
"""

import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from llama3_assets import meta_tokenizer_path

import llama_jax
from infer.grammar import (
    Constraint,
    ResponseFormatError,
    allow_all,
    apply_bitmask,
    bitmask_words,
    canonical_response_format,
    compile_response_format,
)
from infer.protocol import ChatRequest, CompletionRequest
from infer.sampling import SamplingError, SamplingParams
from llama_jax.tokenizer import ByteTokenizer, Tokenizer

MODEL = meta_tokenizer_path()
needs_llama3 = pytest.mark.skipif(MODEL is None, reason="Meta's Llama 3 tokenizer.model not found")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
VOCAB = 128_256 + 40  # a model vocabulary padded past the tokenizer's, not a multiple of 32
TOKEN_CAP = 300

masked = jax.jit(apply_bitmask)


def unpack(mask: np.ndarray, vocab: int) -> np.ndarray:
    """numpy reference: bit i % 32 of word i // 32 (little-endian words) is token i."""
    return np.unpackbits(mask.view(np.uint8), axis=-1, bitorder="little")[..., :vocab].astype(bool)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


def sample_documents(tok, response_format, n, seed, bias=None, vocab=VOCAB) -> list[str]:
    """`n` documents sampled at temperature 1 from random logits, all rows in one batch."""
    rng = np.random.default_rng(seed)
    grammar = compile_response_format(response_format)
    rows = [Constraint(grammar, tok, vocab, tok.stop_tokens) for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    open_rows = list(range(n))
    mask = allow_all(n, vocab)
    for step in range(TOKEN_CAP):
        for r in open_rows:
            rows[r].fill_mask(mask[r])
        logits = rng.standard_normal((n, vocab), np.float32) * 2.0
        if bias is not None and step >= 10:
            logits += bias
        out = np.asarray(masked(jnp.asarray(logits), jnp.asarray(mask)))
        gumbel = -np.log(-np.log(rng.random((n, vocab), np.float32) + 1e-20) + 1e-20)
        tokens = np.argmax(out + gumbel, axis=-1)
        for r in list(open_rows):
            token = int(tokens[r])
            done = rows[r].is_done()
            assert rows[r].accept(token), (r, token, rows[r].error)
            if token in tok.stop_tokens:
                assert done  # a stop token only once the document is complete
                open_rows.remove(r)
            else:
                ids[r].append(token)
        if not open_rows:
            break
    assert not open_rows, f"{len(open_rows)} rows did not finish within {TOKEN_CAP} tokens"
    return [tok.decode(row) for row in ids]


@needs_llama3
def test_fifty_random_samples_validate_against_the_schema(tok):
    docs = sample_documents(tok, SCHEMA_FORMAT, 50, seed=0)
    assert len(docs) == 50
    for doc in docs:
        value = json.loads(doc)
        jsonschema.validate(value, SCHEMA)
        assert list(value) == ["name", "age", "color", "tags"]  # the schema's order
    assert len(set(docs)) > 40  # random, not one forced document


@needs_llama3
def test_json_object_samples_parse_as_objects(tok):
    # Unbounded strings and nesting would take random logits a long time to close, so after
    # a few free tokens the logits favour tokens that close strings, arrays and objects.
    closing = np.zeros(VOCAB, np.float32)
    for i in range(tok.n_words - 256):
        b = tok.token_bytes(i)
        closing[i] = 8.0 * (b.count(b"}") + b.count(b"]") + b.count(b'"')) - 8.0 * (
            b.count(b"{") + b.count(b"[") + b.count(b",")
        )
    docs = sample_documents(tok, {"type": "json_object"}, 8, seed=1, bias=closing)
    for doc in docs:
        assert isinstance(json.loads(doc), dict), doc


@needs_llama3
def test_masks_forbid_padding_and_specials_until_the_document_is_complete(tok):
    grammar = compile_response_format({"type": "json_object"})
    eot = tok.eot_id
    c = Constraint(grammar, tok, VOCAB, [eot])
    first = unpack(c.mask(), VOCAB)
    assert first[tok.encode("{")[0]]
    assert all(tok.token_bytes(int(i)).startswith(b"{") for i in np.flatnonzero(first))
    assert not first[tok.n_words - 256 :].any()  # specials and padding ids
    bad = tok.encode("[")[0]
    assert not first[bad]
    body = tok.encode('{"a": [1, "x"]')
    for t in body:
        assert unpack(c.mask(), VOCAB)[t]
        assert c.accept(t)
    assert not c.is_done() and not unpack(c.mask(), VOCAB)[eot]
    assert c.accept(tok.encode("}")[0])
    assert c.is_done()
    final = unpack(c.mask(), VOCAB)
    assert np.flatnonzero(final).tolist() == [eot]  # only the request's stop token
    assert c.accept(eot)


@needs_llama3
def test_a_token_the_mask_forbids_is_refused(tok):
    c = Constraint(compile_response_format({"type": "json_object"}), tok, VOCAB, tok.stop_tokens)
    assert not c.accept(tok.encode("[")[0])
    assert c.error
    assert np.flatnonzero(unpack(c.mask(), VOCAB)).tolist() == sorted(tok.stop_tokens)


def test_sentencepiece_samples_validate(shared_assets):
    pytest.importorskip("sentencepiece")
    from llama_jax.sentencepiece_tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(shared_assets / "stories260K/tok512.model")
    for doc in sample_documents(sp, SCHEMA_FORMAT, 10, seed=2, vocab=sp.n_words + 3):
        jsonschema.validate(json.loads(doc), SCHEMA)


def test_byte_tokenizer_masks():
    bt = ByteTokenizer()
    c = Constraint(compile_response_format(SCHEMA_FORMAT), bt, 520, bt.stop_tokens)
    assert np.flatnonzero(unpack(c.mask(), 520)).tolist() == [ord("{")]
    for b in b'{"name": "ab", "age": 7, "color": "red", "tags": ["x"]}':
        assert c.accept(b)
    assert c.is_done()
    assert np.flatnonzero(unpack(c.mask(), 520)).tolist() == sorted(bt.stop_tokens)


@pytest.mark.parametrize("vocab", [100, 64, 1000, 128_256])
def test_apply_bitmask_matches_numpy(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab), np.float32)
    mask = rng.integers(-(2**31), 2**31, (3, bitmask_words(vocab)), dtype=np.int64)
    mask = mask.astype(np.int32)
    mask[2] = -1  # an unconstrained row
    got = np.asarray(masked(jnp.asarray(logits), jnp.asarray(mask)))
    want = np.where(unpack(mask, vocab), logits, -np.inf)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[2], logits[2])
    assert np.isneginf(got[:2]).any()


def test_apply_bitmask_rejects_a_mask_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"bitmask must be \[2, 4\]"):
        apply_bitmask(jnp.zeros((2, 100)), jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "xml"}, "type must be json_object, json_schema or text; got 'xml'"),
        ({"type": "json_schema"}, "json_schema must be an object with a 'schema'"),
        ({"type": "json_schema", "json_schema": {"schema": 3}}, "schema must be an object"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}},
            "json_schema.schema is invalid or unsupported: Invalid type: foo",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "string", "format": "zzz"}, "strict": True},
            },
            "Unknown format: zzz",
        ),
    ],
)
def test_bad_response_formats_fail_with_one_line(response_format, message):
    with pytest.raises(ResponseFormatError, match=r"^response_format ") as e:
        compile_response_format(response_format)
    assert message in str(e.value) and "\n" not in str(e.value)
    text = canonical_response_format(response_format)
    with pytest.raises(SamplingError) as e:
        SamplingParams(response_format=text)
    assert e.value.field == "response_format" and message in str(e.value)
    for request in (
        CompletionRequest(prompt="hi", response_format=response_format),
        ChatRequest(messages=[{"role": "user", "content": "hi"}], response_format=response_format),
    ):
        with pytest.raises(SamplingError, match=r"^response_format "):
            request.sampling(16, False, 0)  # the server turns SamplingError into a 400


def test_strict_false_ignores_keywords_it_cannot_enforce():
    schema = {"type": "string", "format": "zzz"}
    compile_response_format({"type": "json_schema", "json_schema": {"schema": schema}})


def test_requests_carry_response_format_as_hashable_text():
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], response_format=SCHEMA_FORMAT)
    params = chat.sampling(16, False, 0)
    assert json.loads(params.response_format) == SCHEMA_FORMAT
    assert params == CompletionRequest(prompt="x", response_format=SCHEMA_FORMAT).sampling(
        16, False, 0
    )
    hash(params)
    text = CompletionRequest(prompt="x", response_format={"type": "text"}).sampling(16, False, 0)
    assert text.response_format is None
    with pytest.raises(SamplingError, match="response_format must be JSON text"):
        SamplingParams(response_format={"type": "json_object"})


@pytest.mark.slow
def test_fifty_outputs_of_a_random_model_validate_through_the_engine(shared_assets):
    """The engine applies each request's mask in its decode step: 50 sampled answers of a
    random model (the stories260K tokenizer's 512 tokens) all parse and validate."""
    pytest.importorskip("sentencepiece")
    from infer.generate import generate
    from llama_jax.sentencepiece_tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(shared_assets / "stories260K/tok512.model")
    config = llama_jax.preset("tiny", max_seq_len=512)  # vocab 512
    model = llama_jax.Model(config, llama_jax.init(config, seed=0).params, sp)
    out = generate(
        model, ["A person: "] * 50, max_batch=16, max_new_tokens=200, temperature=1.0,
        response_format=SCHEMA_FORMAT,
    )  # fmt: skip
    assert all(c.finish_reason == "stop" for c in out)
    for c in out:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in out}) > 1
