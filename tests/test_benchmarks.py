"""Smoke test of the benchmark harness on the tiny preset: one iteration per row, in-process.

It checks the report's shape and arithmetic, never a timing.
"""

import copy
import json

import pytest

from benchmarks import run, serve
from benchmarks.report import table
from benchmarks.workload import ROWS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    run.main(
        [
            "--preset", "tiny", "--iters", "1", "--warmup", "0", "--in-process",
            "--quick-limits", "--decode-path", "loop", "--steps-per-call", "4",
            "--max-foreign", "1", "--new-tokens", "8",
            "--out", str(out),
        ]
    )  # fmt: skip
    return json.loads(out.read_text())


def test_report_shape(report):
    assert report["limits"]["matmul_gflops"] > 0 and report["limits"]["read_gbs"] > 0
    assert [r["name"] for r in report["rows"]] == [r.name for r in ROWS]
    for row in report["rows"]:
        assert row["unit"] == "tokens/s"
        assert row["ours"] > 0 and row["reference"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["reference"])
        detail = row["reference_detail"]
        utilisation = detail.get("bandwidth_util", detail.get("mfu"))
        assert row["ratio_ceiling"] == pytest.approx(1 / utilisation)
        assert row["targets"]


def test_utilisation_and_agreement(report):
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("decode_b1", "decode_b8"):
        assert rows[name]["ours_detail"]["bandwidth_util"] > 0
        assert rows[name]["shape"]["new_tokens"] == 8
        assert rows[name]["agreement"]["first_tokens_equal"]
    assert rows["prefill_512"]["agreement"]["argmax_equal"]
    assert rows["prefill_512"]["agreement"]["max_abs_logit_diff"] < 1e-3
    assert rows["train_b4x256"]["ours_detail"]["mfu"] > 0
    for name in ("decode_b1_int8", "decode_b8_int8"):  # ours int8 over ours float32, same run
        assert rows[name]["vs_float32"] == pytest.approx(
            rows[name]["ours"] / rows[name.removesuffix("_int8")]["ours"]
        )
    assert rows["decode_b1_int8"]["targets"]["vs_float32"]["target"] == 1.8
    assert rows["train_b4x256"]["agreement"]["abs_diff"] < 1e-3


def test_only_selects_rows():
    assert [r.name for r in run.select_rows("decode,train_b4x256")] == [
        "decode_b1",
        "decode_b8",
        "decode_b1_int8",
        "decode_b8_int8",
        "decode_b1_spec",
        "decode_b8_spec",
        "train_b4x256",
    ]
    with pytest.raises(SystemExit):
        run.select_rows("nonsense")


def test_table_shows_the_first_start_beside_the_cached_one(report):
    assert report["meta"]["ours_compile_cache"] is False  # in-process: no cache
    row = copy.deepcopy(report["rows"][0])
    row["ours_detail"] |= {"cold_first_token_s": 0.5, "peak_rss_mb": 800.0}
    row["ours_detail"]["first_start"] = {
        "cold_s": 9.0, "cold_first_token_s": 7.25, "peak_rss_mb": 1000.0
    }  # fmt: skip
    text = table({**report, "rows": [row]})
    assert "| 0.50 (7.25) / " in text and "| 800 (1,000) / " in text
    assert "in brackets, that first start" in text


@pytest.mark.slow
def test_serve_quick_end_to_end(tmp_path):
    """`benchmarks.serve --quick` over HTTP: every configuration reports its figures, and the
    scheduler's counts show what each comparison is about. No timing is compared."""
    out = tmp_path / "serve.json"
    serve.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    scale = serve.QUICK
    assert report["meta"]["quick"] and report["meta"]["scale"]["context"] == scale.context
    runs = {(e, c): report[e][c] for e in serve.EXPERIMENTS for c in report[e]}
    assert set(runs) == {
        ("capacity", "paged"), ("capacity", "paged_same_slots"), ("capacity", "contiguous"),
        ("prefix", "on"), ("prefix", "off"),
        ("chunking", "chunked"), ("chunking", "unchunked"),
    }  # fmt: skip
    vocab = report["meta"]["config"]["vocab_size"]
    wanted = sum(c.max_tokens for c in serve.capacity_trace(scale, serve.Tokens(vocab, 0)))
    for r in runs.values():
        assert r["errors"] == []
        assert r["output_tokens"] > 0 and r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
        assert 1 <= r["max_concurrent"] <= r["setup"]["slots"]
        assert 0 < r["peak_kv_bytes"] <= r["pool_kv_bytes"]
        assert r["peak_kv_bytes"] == r["peak_kv_blocks"] * r["kv_bytes_per_block"]

    paged, contiguous = runs["capacity", "paged"], runs["capacity", "contiguous"]
    assert paged["pool_kv_bytes"] == contiguous["pool_kv_bytes"]  # the same KV budget
    for r in (paged, runs["capacity", "paged_same_slots"], contiguous):
        assert r["output_tokens"] == wanted
    assert paged["max_concurrent"] >= contiguous["max_concurrent"]
    assert contiguous["max_concurrent"] <= scale.pool_contexts

    on, off = runs["prefix", "on"], runs["prefix", "off"]
    assert on["cached_tokens"] > 0 and off["cached_tokens"] == 0
    assert on["prefilled_tokens"] < off["prefilled_tokens"]
    assert 0 < on["repeat_cached_tokens"] <= scale.repeat_prefix
    assert off["repeat_cached_tokens"] == 0

    chunked, unchunked = runs["chunking", "chunked"], runs["chunking", "unchunked"]
    assert chunked["prefill_budget"] < scale.long_len <= unchunked["prefill_budget"]
    for r in (chunked, unchunked):
        assert r["by_tag"]["stream"]["itl_p99_s"] is not None
        assert r["by_tag"]["long"]["ttft_p50_s"] is not None
    assert "| capacity | paged |" in serve.table(report)
