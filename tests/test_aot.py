"""`python -m sharding.aot` compiles tiny train and decode steps (contiguous and paged KV
caches) for v5p:2x2x1, v5e:2x2 and v5e:1x2 topologies on this CPU machine (skipped without `libtpu`). The compiles run in a subprocess:
libtpu keeps process-wide state, and the test session's JAX must stay a plain 8-CPU-device one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_jax.config import preset

pytest.importorskip("libtpu", reason="libtpu (the `tpu` extra) is needed for TPU AOT compiles")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


SCRIPT = textwrap.dedent("""
    import json
    from dataclasses import asdict
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from llama_jax.config import preset
    from sharding import aot
    from sharding.mesh import make_mesh

    aot.main(["--preset", "tiny", "--topology", "v5p:2x2x1", "--slices", "2", "--mesh",
              "data=2:dcn,fsdp=-1", "--batch", "8", "--seq", "256", "--remat", "none", "--json"])
    aot.main(["--preset", "tiny", "--topology", "v5p:2x2x1", "--batch", "8", "--seq", "256",
              "--remat", "none", "--json"])
    aot.main(["--preset", "tiny", "--topology", "v5p:2x2x1", "--step", "decode", "--mesh",
              "data=2,tensor=2", "--batch", "8", "--seq", "512", "--compute-dtype", "float32",
              "--json"])
    config = preset("tiny", n_layers=3, remat="full")
    mesh = make_mesh("fsdp=-1", aot.topology_devices("v5p:2x2x1"))
    flops, seconds = aot.layer_costs(aot.compile_train, config, mesh, "fsdp", 4, 64)
    with aot.unrolled_scans():
        compiled = aot.compile_train(config, mesh, "fsdp", 4, 64)
    print(json.dumps({"flops": flops / aot.compiled_cost(compiled)["flops"],
                      "seconds": seconds / aot.compiled_seconds(compiled)}))
    wide_heads = preset("tiny", dim=256, n_heads=2, n_kv_heads=1, head_dim=128, remat="full")
    for attention in ("auto", "xla"):
        compiled = aot.compile_train(wide_heads.replace(attention=attention), mesh, "fsdp", 4, 2048)
        print(json.dumps({"temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                          "pallas_kernel": "tpu_custom_call" in compiled.as_text()}))
    # v5e: a 16k vocabulary's output head gets sliced prefetches (ConcatBitcast custom calls)
    v5e = aot.run("tiny", "v5e:2x2", batch=4, seq=64, overrides={"vocab_size": 16384})
    print(json.dumps({**asdict(v5e), "line": aot.format_report(v5e).splitlines()[-1]}))
    replicated = NamedSharding(make_mesh("fsdp=-1", aot.topology_devices("v5e:2x2")),
                               PartitionSpec())
    shape = lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=replicated)
    head = lambda h, w: jax.nn.logsumexp(
        (h.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32), -1).sum()
    lowered = jax.jit(jax.grad(head)).lower(shape((4, 128, 64)), shape((64, 16384)))
    sliced = lowered.compile()
    unsliced = lowered.compile(compiler_options={"xla_tpu_sliced_prefetch_max_slices": 0})
    print(json.dumps({f"{k}_{f}": v for k, c in (("sliced", sliced), ("unsliced", unsliced))
                      for f, v in (("seconds", aot.compiled_seconds(c)),
                                   ("concat_bitcasts", c.as_text().count("ConcatBitcast")))}))
    for kv in ("contiguous", "paged"):
        aot.main(["--preset", "tiny", "--topology", "v5e:1x2", "--step", "decode", "--batch", "8",
                  "--seq", "512", "--compute-dtype", "float32", "--kv", kv, "--json"])
    # head_dim 128: "auto" decodes over the paged pool with the Pallas paged-attention kernel
    wide_kv = preset("tiny", dim=256, n_heads=4, n_kv_heads=2, head_dim=128)
    mesh = make_mesh("tensor=-1", aot.topology_devices("v5e:1x2"))
    for attention in ("auto", "xla"):
        text = aot.compile_decode(wide_kv.replace(attention=attention), mesh, "infer_tp", 4, 512,
                                  kv="paged", block_size=16).as_text()
        print(json.dumps({"tpu_custom_call": 'custom_call_target="tpu_custom_call"' in text,
                          "paged_attention": "paged_attention" in text}))
    for lora in ([], ["--lora-rank", "4"]):
        aot.main(["--preset", "tiny", "--topology", "v5e:2x2", "--batch", "4", "--seq", "64",
                  "--json", *lora])
""")


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    """Multi-slice train report, train report, decode report, extrapolation ratios, splash and
    plain attention memory, a v5e train report, v5e sliced-prefetch estimates, contiguous and
    paged decode reports on v5e:1x2, paged decode with and without the kernel, full and LoRA
    train reports on v5e:2x2: one process, one libtpu start-up (the multi-slice topology must come first: libtpu keeps state)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-14:]]


def test_train_step_compiles_for_v5p_with_fsdp_memory(runs):
    r = runs[1]
    n = preset("tiny").param_count()
    assert (r["chips"], r["mesh"], r["rules"], r["step"]) == (4, {"fsdp": 4}, "fsdp", "train")
    assert r["hbm_bytes"] == 95 * GiB and r["fits"]
    # fp32 weights + two AdamW moments, split four ways, plus the batch and a few scalars
    state = 3 * 4 * n // 4
    assert state <= r["argument_bytes"] <= state + 2**20
    assert (
        r["per_chip_bytes"]
        == r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"] - r["alias_bytes"]
    )
    assert r["alias_bytes"] >= state  # the donated state is updated in place
    # remat=none: the compiler does the model's matmuls and a little more (softmax, norms, ...)
    assert 1.0 <= 4 * r["compiler_flops_per_chip"] / r["flops_per_step"] < 1.5
    assert r["cost_complete"] and r["est_step_seconds"] > 0 and 0 < r["est_mfu"] < 1
    assert r["tokens_per_sec_per_chip"] == pytest.approx(8 * 256 / r["est_step_seconds"] / 4)


def test_decode_step_compiles_with_a_tensor_parallel_cache(runs):
    r = runs[2]
    c = preset("tiny")
    assert (r["mesh"], r["rules"]) == ({"data": 2, "tensor": 2}, "infer_tp")
    cache = 2 * c.n_layers * 8 * 512 * c.n_kv_heads * c.head_dim * 4  # k and v, float32
    assert r["argument_bytes"] >= cache // 4 + 2 * c.param_count() // 4
    assert r["fits"] and r["est_step_seconds"] > 0
    assert (r["kv"], r["block_size"]) == ("contiguous", None)  # the default layout


def test_paged_decode_cache_holds_the_contiguous_cache_bytes(runs):
    """`--kv paged`: a pool of 8 x 512 tokens in 16-token blocks, heads split over tensor=2 like
    the contiguous cache's, costs what the contiguous cache does per chip, plus its block table
    (int32 [8, 32], padded to one [8, 128] tile); both are donated and updated in place."""
    contiguous, paged = runs[8], runs[9]
    assert (contiguous["kv"], paged["kv"], paged["block_size"]) == ("contiguous", "paged", 16)
    assert paged["mesh"] == contiguous["mesh"] == {"tensor": 2}
    c = preset("tiny")
    cache = 2 * c.n_layers * 8 * 512 * c.n_kv_heads * c.head_dim * 4 // 2  # k and v, per chip
    table = 8 * (512 // 16) * 4
    assert contiguous["alias_bytes"] >= cache and paged["alias_bytes"] >= cache
    extra = paged["argument_bytes"] - contiguous["argument_bytes"]
    assert table <= extra <= 8 * 128 * 4
    assert paged["fits"] and paged["est_step_seconds"] > 0


def test_layer_cost_extrapolation_matches_an_unrolled_compile(runs):
    """XLA counts a scanned layer once; the 1- and 2-layer extrapolation must equal a compile of
    the whole unrolled 3-layer stack."""
    assert runs[3]["flops"] == pytest.approx(1.0, rel=1e-3)
    assert runs[3]["seconds"] == pytest.approx(1.0, rel=0.1)


def test_two_slices_put_data_parallelism_over_dcn(runs):
    multi, single = runs[0], runs[1]
    assert (multi["chips"], multi["topology"], multi["mesh"]) == (
        8,
        "2x v5p:2x2x1",
        {"data": 2, "fsdp": 4},
    )
    # weights replicated over data: the same state per chip, one batch row fewer (5 int32/f32)
    assert single["argument_bytes"] - multi["argument_bytes"] == 5 * 256 * 4
    assert multi["est_step_seconds"] is None  # the compiler gives no estimate across DCN
    assert "multi-slice (DCN)" in multi["no_estimate"]


def test_auto_attention_takes_the_splash_kernel_on_tpu(runs):
    """head_dim 128, 2048 tokens: "auto" compiles the Pallas kernel, and a layer's attention no
    longer holds [heads, time, time] scores (32 MiB per chip here in float32)."""
    splash, plain = runs[4], runs[5]
    assert splash["pallas_kernel"] and not plain["pallas_kernel"]
    assert plain["temp_bytes"] - splash["temp_bytes"] > 32 * 2**20


def test_v5e_train_step_has_a_step_time_estimate(runs):
    """On v5e (and v6e) the compiler slices large prefetches; libtpu's cost analysis counts each
    "ConcatBitcast" that joins the slices as -1 s, which made a single-slice step look like it
    had no estimate ("across DCN")."""
    r = runs[6]
    assert (r["topology"], r["chips"], r["hbm_bytes"]) == ("v5e:2x2", 4, 16 * GiB)
    assert r["est_step_seconds"] > 0 and 0 < r["est_mfu"] < 1 and r["no_estimate"] is None
    assert r["tokens_per_sec_per_chip"] == pytest.approx(4 * 64 / r["est_step_seconds"] / 4)
    assert r["line"].startswith("  est. step ") and "MFU" in r["line"] and "DCN" not in r["line"]


def test_sliced_prefetch_placeholders_are_taken_out_of_the_estimate(runs):
    """The same program compiled without sliced prefetches (so without the placeholders) is
    estimated within a few percent: the slices only overlap the copies a little better."""
    c = runs[7]
    assert c["sliced_concat_bitcasts"] > 0 and c["unsliced_concat_bitcasts"] == 0
    assert c["sliced_seconds"] == pytest.approx(c["unsliced_seconds"], rel=0.2)


def test_auto_attention_decodes_a_paged_pool_with_the_pallas_kernel(runs):
    """head_dim 128, one token per row: the compiled decode step holds the paged-attention
    kernel's custom call; `attention="xla"` keeps the gather."""
    kernel, gather = runs[10], runs[11]
    assert kernel == {"tpu_custom_call": True, "paged_attention": True}
    assert not gather["tpu_custom_call"] and not gather["paged_attention"]


def test_lora_train_step_holds_a_frozen_bf16_base_and_adapter_state(runs):
    """The LoRA step's arguments: a bf16 base (2 bytes a weight) and fp32 adapters with their
    moments, against fp32 weights and two moments (12 bytes a weight) trained whole; its model
    FLOPs leave out the base's weight gradients (4 N instead of 6 N)."""
    full, lora = runs[12], runs[13]
    assert full["lora"] is None and lora["lora"] == "r=4 on q,k,v,o,gate,up,down"
    assert lora["fits"] and lora["argument_bytes"] < full["argument_bytes"] / 2
    config = preset("tiny")
    n, seq = config.matmul_params(), 64
    attention = 6 * config.n_layers * config.n_heads * config.head_dim * seq
    assert full["flops_per_step"] == 4 * seq * (6 * n + attention)
    assert 4 * seq * (4 * n + attention) < lora["flops_per_step"] < full["flops_per_step"]
