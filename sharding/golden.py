"""Golden per-parameter sharding of the big presets, committed so that a rule change shows up in
review as a diff of `tests/golden/*.json` (checked by `tests/test_sharding_golden.py`).

    python -m sharding.golden           # compare, exit 1 on any difference
    python -m sharding.golden --write   # regenerate after an intended rule change

The files live in the repository's tests directory, found from this file's location, so the tool
works from a checkout (or an editable install of one), whatever the working directory.

Everything comes from shapes (`param_shapes` is an `eval_shape`) and mesh axis sizes: no
devices, nothing allocated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
from jax.sharding import PartitionSpec

from llama_jax import model as llama_model
from llama_jax.config import preset
from sharding.mesh import MeshSpec
from sharding.rules import param_specs, path_str

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "tests" / "golden"
MODELS = ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b")
# (rules, mesh) pairs: the training presets at pod scale and a tensor-parallel serving mesh.
CASES = (
    ("fsdp", "fsdp=256"),
    ("fsdp", "data=4,fsdp=64"),
    ("fsdp_tp", "data=2,fsdp=16,tensor=8"),
    ("infer_tp", "data=2,tensor=8"),
)


def _spec_json(spec: PartitionSpec) -> list[Any]:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _shard_shape(shape: tuple[int, ...], spec: PartitionSpec, sizes: dict[str, int]) -> list[int]:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    splits = [
        math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e or ())) for e in entries
    ]
    return [n // s for n, s in zip(shape, splits, strict=True)]


def compute(model: str) -> dict[str, Any]:
    """Per mesh: mesh sizes, per-device parameter bytes, and per parameter its shape, spec and
    per-device shard shape."""
    config = preset(model)
    shapes = llama_model.param_shapes(config)
    out: dict[str, Any] = {"model": model, "param_dtype": config.param_dtype, "meshes": {}}
    for rules, mesh in CASES:
        ms = MeshSpec.parse(mesh)
        sizes = ms.sizes(math.prod(ms.ici.values()))
        specs = param_specs(config, sizes, rules)
        params, device_bytes = {}, 0
        flat = jax.tree.leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for (path, spec), shape in zip(flat, jax.tree.leaves(shapes), strict=True):
            shard = _shard_shape(shape.shape, spec, sizes)
            params[path_str(path)] = {
                "shape": list(shape.shape),
                "spec": _spec_json(spec),
                "shard": shard,
            }
            device_bytes += math.prod(shard) * shape.dtype.itemsize
        out["meshes"][f"{rules} {mesh}"] = {
            "rules": rules,
            "mesh": sizes,
            "param_bytes_per_device": device_bytes,
            "params": params,
        }
    return out


def path(model: str) -> Path:
    return DIR / f"{model}.json"


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sharding.golden", description=__doc__.split("\n")[0]
    )
    p.add_argument("--write", action="store_true", help="regenerate the golden files")
    args = p.parse_args(argv)
    if not DIR.parent.is_dir():
        print(f"{DIR.parent}: no tests directory; run this from a checkout of the repository")
        return 2
    stale = []
    for model in MODELS:
        text = render(compute(model))
        if args.write:
            DIR.mkdir(exist_ok=True)
            path(model).write_text(text)
        elif not path(model).exists() or path(model).read_text() != text:
            stale.append(str(path(model)))
    if stale:
        print(f"differs from the rules: {', '.join(stale)}; rerun with --write if intended")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
