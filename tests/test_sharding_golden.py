"""The committed per-parameter sharding of llama3.1-8b/70b/405b (`tests/golden/`) matches the
rule table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sharding import golden

GOLDEN = Path(__file__).resolve().with_name("golden")


def test_tool_writes_beside_the_tests():
    assert golden.DIR == GOLDEN
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(golden.MODELS)


@pytest.mark.parametrize("model", golden.MODELS)
def test_golden_sharding_specs(model):
    expected = json.loads((GOLDEN / f"{model}.json").read_text())
    actual = json.loads(golden.render(golden.compute(model)))
    assert actual == expected, (
        f"sharding of {model} changed: if intended, run `python -m sharding.golden --write` "
        f"and commit {golden.path(model)}"
    )


def test_golden_fsdp256_holds_one_256th_of_405b_per_device():
    mesh = json.loads((GOLDEN / "llama3.1-405b.json").read_text())["meshes"]["fsdp fsdp=256"]
    total = sum(4 * math.prod(p["shape"]) for p in mesh["params"].values())
    assert mesh["param_bytes_per_device"] * 256 == total
    assert mesh["params"]["layers/attention/wq"]["spec"] == [None, "fsdp"]
