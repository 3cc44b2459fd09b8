"""Smoke test of the benchmark harness on the tiny preset: one iteration per row, in-process.

It checks the report's shape and arithmetic, never a timing.
"""

import copy
import json

import pytest

from benchmarks import run
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
    assert rows["train_b4x256"]["agreement"]["abs_diff"] < 1e-3


def test_only_selects_rows():
    assert [r.name for r in run.select_rows("decode,train_b4x256")] == [
        "decode_b1",
        "decode_b8",
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
