"""Weight-only int8/fp8 quantization (`llama_jax.quantize`).

Oracles: the float weights (rounding error bounds per output channel); the float forward
(quantized logits close); the trained stories260K model (greedy agreement and KL against
float32); the stored tree (bit-exact round trip through `convert --quantize`); the
single-device forward (sharded quantized forward equal to it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.cli import generation_parser, load_model
from infer.layer_views import unstack_layers
from llama_jax import quantize
from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.placement import resolve_shardings
from llama_jax.config import preset
from llama_jax.convert import main as convert_main
from llama_jax.model import forward, param_shapes
from sharding.mesh import make_mesh
from sharding.rules import resolver, with_rules

TINY = preset("tiny")
TOKENS = (np.arange(24, dtype=np.int32).reshape(2, 12) * 7) % TINY.vocab_size
logits = jax.jit(lambda p: forward(p, TOKENS, config=TINY)[0])


@pytest.fixture(scope="module")
def params():
    """Random weights of the tiny preset, norms included (cheaper than `init_params`)."""
    shapes = param_shapes(TINY)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(shapes))))
    return jax.tree.map(lambda s: 0.05 * jax.random.normal(next(keys), s.shape), shapes)


@pytest.fixture(scope="module")
def stories(shared_assets):
    root = shared_assets / "stories260K"
    tokens = json.loads((root / "expected/greedy_from_bos.json").read_text())["tokens"]
    return root / "hf", np.asarray(tokens, np.int32)


def test_int8_and_fp8_rounding_stays_within_their_steps():
    w = jax.random.normal(jax.random.key(0), (3, 96, 4, 8)) * jnp.linspace(0.01, 2.0, 32).reshape(
        4, 8
    )
    for mode in ("int8", "fp8"):
        q = quantize._quantize_jit(w, mode, 1, 1)
        assert q.values.shape == (3, 4, 8, 96) and q.scale.shape == (3, 4, 8)
        assert q.values.dtype == quantize.MODES[mode][0] and q.scale.dtype == jnp.float32
        err = jnp.abs(jax.jit(quantize.dequantize, static_argnums=(1, 2))(q, 1, 1) - w)
        step = q.scale[:, None]  # [layers, 1, heads, head_dim]: one per output channel
        if mode == "int8":  # round to nearest: half a step of amax / 127
            assert float(jnp.max(err / step)) <= 0.5 + 1e-4
        else:  # e4m3: 3 mantissa bits (relative 2^-4), subnormals 2^-9 steps near zero
            assert bool(jnp.all(err <= jnp.abs(w) * 2.0**-4 + step * 2.0**-10))
        amax = jnp.max(jnp.abs(w), axis=1)
        np.testing.assert_allclose(q.scale * quantize.MODES[mode][1], amax, rtol=1e-6)


def test_quantized_forward_is_close_to_float_and_layer_views_agree(params):
    want = logits(params)
    q = quantize.quantize_params(params, TINY)
    assert quantize.quantization_of(q) == "int8"
    got = logits(q)
    err = float(jnp.max(jnp.abs(got - want)))
    assert 0 < err < 0.02, err  # quantized (not the float path), and close
    np.testing.assert_allclose(logits(unstack_layers(q)), got, atol=1e-5, rtol=0)


def test_cpu_chunked_product_equals_the_dequantized_matmul():
    w = jax.random.normal(jax.random.key(1), (2048, 96))  # [in, out]: 16 chunks of 6 rows
    q = quantize.quantize_weight(w, "int8")
    assert quantize._cpu_chunk(96, 2048) == 48
    x = jax.random.normal(jax.random.key(2), (3, 2048))
    got = jax.jit(quantize.quantized_dense)(x, q)
    np.testing.assert_allclose(got, x @ quantize.dequantize(q), atol=1e-4, rtol=1e-5)


def test_stories260k_int8_greedy_agrees_with_float32(stories):
    hf, tokens = stories
    model = load(hf)
    assert model.config.tie_embeddings  # the head is a quantized copy of the embedding table
    logits = jax.jit(lambda p, t: forward(p, t, config=model.config)[0])
    want = logits(model.params, tokens[None, :-1])[0]
    got = logits(quantize.quantize_params(model.params, model.config), tokens[None, :-1])[0]
    np.testing.assert_array_equal(want.argmax(-1), tokens[1:])  # float32 reproduces the reference
    agree = float(jnp.mean(got.argmax(-1) == tokens[1:]))
    log_p, log_q = jax.nn.log_softmax(want), jax.nn.log_softmax(got)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    print(f"stories260K int8: {agree:.1%} of 256 greedy tokens agree, "
          f"KL(float32 || int8) mean {float(kl.mean()):.2e} max {float(kl.max()):.2e}")  # fmt: skip
    assert agree >= 0.95
    assert float(kl.mean()) < 1e-3 and float(kl.max()) < 1e-2


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_convert_quantize_round_trips_bit_exactly(stories, tmp_path, mode):
    hf, _ = stories
    dst = tmp_path / mode
    assert (
        convert_main([str(hf), str(dst), "--to", "orbax", "--quantize", mode, "--no-progress"]) == 0
    )
    assert json.loads((dst / "llama_jax.json").read_text())["quantization"] == mode
    source = load(hf)
    want = quantize.quantize_params(source.params, source.config, mode)
    got = load(dst).params
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_convert_quantize_needs_orbax(stories, tmp_path, capsys):
    hf, _ = stories
    assert convert_main([str(hf), str(tmp_path / "x"), "--to", "hf", "--quantize", "int8"]) == 1
    assert "--quantize needs --to orbax" in capsys.readouterr().err


def test_sharded_quantized_forward_equals_single_device(params):
    q = quantize.quantize_params(params, TINY)
    mesh = make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    shardings = resolve_shardings(TINY, resolver(mesh, "infer_tp"), "int8")
    placed = jax.device_put(q, shardings)
    wq = placed["layers"]["attention"]["wq"]
    assert wq.values.sharding.spec == shardings["layers"]["attention"]["wq"].values.spec
    assert "tensor" in str(wq.values.sharding.spec)  # heads split, scales beside them
    run = jax.jit(with_rules(lambda p, t: forward(p, t, config=TINY)[0], mesh, "infer_tp"))
    np.testing.assert_allclose(run(placed, TOKENS), logits(q), atol=1e-5)


def test_quantize_flag_quantizes_at_load(stories):
    hf, _ = stories
    args = ["--checkpoint", str(hf), "--quantize", "fp8", "--prompt", "x"]
    model = load_model(generation_parser().parse_args(args))
    assert quantize.quantization_of(model.params) == "fp8"
    assert quantize.as_quantized(model.params, model.config, "fp8") is model.params  # kept
    with pytest.raises(ValueError, match="stored quantized as fp8"):
        quantize.as_quantized(model.params, model.config, "int8")


AOT_SCRIPT = """
from sharding import aot
aot.main(["--preset", "tiny", "--topology", "v5e:1x2", "--step", "decode", "--batch", "1",
          "--seq", "128", "--compute-dtype", "float32", "--quantize", "int8", "--json"])
"""


@pytest.mark.slow
def test_aot_decode_compiles_int8_weights_for_tpu():
    """`python -m sharding.aot --step decode --quantize int8` on v5e:1x2 (libtpu on this CPU
    machine, in a subprocess as tests/test_aot.py does): the weights' per-chip bytes are the
    int8 ones (float32 projections would take 4 bytes each)."""
    pytest.importorskip("libtpu", reason="libtpu (the `tpu` extra) is needed for TPU AOT compiles")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert (r["quantize"], r["mesh"], r["fits"]) == ("int8", {"tensor": 2}, True)
    float32_projections_per_chip = 4 * TINY.matmul_params() // 2  # split over tensor=2
    assert r["argument_bytes"] < float32_projections_per_chip  # weights, norms, cache and all
