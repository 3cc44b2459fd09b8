"""The pure parts of `benchmarks.aot_maxtext`: commands, the driver's JSON line, the
extrapolation, the targets and the table. Nothing here installs MaxText or compiles."""

from __future__ import annotations

import json

import pytest

from benchmarks import aot_maxtext as am
from benchmarks import maxtext_driver


def test_rows_describe_one_run_in_both_tools_terms():
    for row in am.ROWS.values():
        generation, shape = row.topology.split(":")
        chips = 1
        for n in shape.split("x"):
            chips *= int(n)
        assert chips == row.chips
        # v5p-N names count TensorCores, two per chip
        assert row.maxtext_topology == f"{generation}-{2 * row.chips}"
    assert am.PREFIX == maxtext_driver.PREFIX
    assert am.UNCOSTED_CUSTOM_CALLS == maxtext_driver.COUNTED_CUSTOM_CALLS


def test_maxtext_overrides():
    row = am.ROWS["8b"]
    assert am.maxtext_overrides(row, scan=True) == [
        "compile_topology=v5p-8",
        "compile_topology_num_slices=1",
        "model_name=llama3.1-8b",
        "per_device_batch_size=1",
        "max_target_length=4096",
        "remat_policy=full",
        "scan_layers=true",
    ]
    big = am.maxtext_overrides(am.ROWS["405b"], scan=False, layers=2)
    assert "per_device_batch_size=0.25" in big  # 64 sequences over 256 chips
    assert "scan_layers=false" in big
    assert {"ici_fsdp_parallelism=64", "ici_context_parallelism=4"} <= set(big)
    assert big[-2:] == ["base_num_decoder_layers=2", "override_model_config=true"]


def test_ours_args():
    assert am.ours_args(am.ROWS["405b"]) == [
        *("--preset", "llama3.1-405b", "--topology", "v5p:8x8x4", "--mesh", "fsdp=-1,sequence=4"),
        *("--batch", "64", "--seq", "8192", "--remat", "full", "--json"),
    ]


def test_parse_driver_output_takes_the_last_result_line():
    record = {"argument_bytes": 1, "optimal_seconds": 0.5, "uncosted_calls": 0}
    stdout = "\n".join(
        [
            "Starting train_compile.py...",
            am.PREFIX + json.dumps({"stale": True}),
            "Cost analysis: {'flops': 1.0}",  # MaxText's own print
            am.PREFIX + json.dumps(record),
        ]
    )
    assert am.parse_driver_output(stdout) == record
    with pytest.raises(RuntimeError, match="no result line"):
        am.parse_driver_output("Cost analysis: {}\n")


def test_driver_seconds_and_extrapolation():
    assert am.driver_seconds({"optimal_seconds": -2.5, "uncosted_calls": 3}) == 0.5
    assert am.driver_seconds({"optimal_seconds": -0.5, "uncosted_calls": 0}) is None
    assert am.extrapolate(1.0, 1.5, 32) == pytest.approx(16.5)
    assert am.extrapolate(None, 1.5, 32) is None


def _side(args: int, temps: int, seconds: float | None) -> am.Side:
    return am.Side(args, temps, 0, seconds, 60.0)


def test_targets_and_table():
    row = am.ROWS["8b"]  # 4 x 4096 tokens over 4 chips
    ours, maxtext = (
        _side(24_100_000_000, 13_000_000_000, 0.8),
        _side(24_100_000_000, 13_500_000_000, 0.7),
    )
    assert am.tokens_per_sec_per_chip(row, ours) == pytest.approx(4096 / 0.8)
    assert am.targets(row, ours, maxtext) == {"memory": True, "tokens_per_sec": False}
    assert am.targets(row, maxtext, ours) == {"memory": False, "tokens_per_sec": True}
    assert am.targets(row, ours, _side(1, 1, None))["tokens_per_sec"] is None
    records = [json.loads(json.dumps(am.result(row, ours, maxtext)))]  # as read from --out
    lines = am.table(records).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2] == (
        "| llama3.1-8b | v5p:2x2x1 = v5p-8 (4) | 4 x 4096 | 24.1 + 13.0 = 37.1 GB / "
        "24.1 + 13.5 = 37.6 GB | 0.80 s / 0.70 s | 5,120 / 5,851 | memory ok, tokens/s MISSED |"
    )
