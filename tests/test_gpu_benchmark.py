"""`python -m benchmarks.gpu --tiny` on this CPU, in-process: every row runs and reports
positive, finite figures; utilisation is None here (a CPU has no data-sheet peak) and is
computed from the same figures when a peak is known. It checks the report, never a timing."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu

ROWS = ["train_1b", "train_8b", "prefill_8b", "decode_8b_b1", "decode_8b_b64"]

pytestmark = pytest.mark.slow  # a dozen small compilations: ~1.5 min on a busy 2-core host


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "results.json"
    gpu.main(["--tiny", "--out", str(out)])
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_row_reports_positive_finite_figures(report):
    assert [r["name"] for r in report["rows"]] == ROWS
    assert report["device"]["peak_flops"] is None and report["device"]["peak_bytes_per_s"] is None
    for row in report["rows"]:
        assert "error" not in row
        assert all(_positive(s) for s in row["seconds_all"])
        assert _positive(row["seconds"]) and _positive(row["tokens_per_s"])
        if row["kind"] == "decode":
            assert _positive(row["step_ms"]) and _positive(row["bytes_per_step"])
            assert row["bandwidth_util"] is None
        else:
            assert _positive(row["flops"]) and _positive(row["tflops_per_s"])
            assert row["mfu"] is None
        assert all(t["value"] is None and t["met"] is None for t in row["targets"].values())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["train_8b"]["n_layers"] == 1  # the tiny stand-in for the cut 8B stack
    assert rows["decode_8b_b64"]["shape"]["batch"] > rows["decode_8b_b1"]["shape"]["batch"]


def test_utilisation_against_a_known_peak(report):
    """The figures of a measured row, recomputed against a made-up peak."""
    cases = {c.row.name: c.row for c in gpu.cases(tiny=True)}
    rows = {r["name"]: r for r in report["rows"]}
    peak = (1e12, 1e10)
    train = gpu.figures(cases["train_1b"], rows["train_1b"], peak)
    assert train["mfu"] == pytest.approx(train["flops"] / train["seconds"] / peak[0])
    assert train["targets"]["mfu"]["met"] == (train["mfu"] >= 0.45)
    decode = gpu.figures(cases["decode_8b_b1"], rows["decode_8b_b1"], peak)
    step = decode["seconds"] / gpu.DECODE_STEPS
    assert decode["bandwidth_util"] == pytest.approx(decode["bytes_per_step"] / peak[1] / step)


def test_table(report):
    text = gpu.table(report)
    assert all(f"| {name} |" in text for name in ROWS)
    assert "no data-sheet peak" in text
