"""Checking a checkpoint directory on disk without loading it (`convert --verify DIR`).

Each layout is checked as far as its files allow: a training run's steps against their checksum
manifests (`integrity`); Hugging Face safetensors headers, each tensor's byte range inside its
file, and the index's files; Meta's `params.json` and every `.pth` archive and tensor range; our
Orbax export's config and Orbax metadata. Every problem is one line naming its file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llama_jax.checkpoint import integrity, orbax_io, run_dir
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.load import detect_layout
from llama_jax.checkpoint.pth import PthFile
from llama_jax.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile
from llama_jax.checkpoint.sources import META_SHARD


def _json_problem(path: Path) -> list[str]:
    """[] when `path` holds JSON, else the line saying why not."""
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path}: missing"]
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{path}: not valid JSON ({e})"]
    return []


def _run(root: Path) -> list[str]:
    """Every step of a run (or the one step directory given) against its manifest."""
    checkpoints, step = run_dir.checkpoint_root(root)
    steps = [step] if step is not None else integrity.saved_steps(checkpoints)
    if not steps:
        return [f"{root}: no training checkpoint found (expected {run_dir.CHECKPOINTS}/<step>/)"]
    return [
        f"{checkpoints / str(s)}/{problem}"
        for s in steps
        for problem in integrity.step_problems(checkpoints / str(s))
    ]


def _safetensors_file(path: Path, names: list[str] | None) -> list[str]:
    """A safetensors file's header and tensor ranges, and the tensors the index puts in it."""
    try:
        entries = SafetensorsFile(path).entries
    except CheckpointError as e:
        return [str(e)]
    missing = [n for n in names or () if n not in entries]
    return [f"{path}: tensor {n}: listed in the index, not in the file" for n in missing]


def _hf(root: Path) -> list[str]:
    problems = _json_problem(root / "config.json")
    index = root / INDEX_FILE
    if not index.is_file():
        return problems + _safetensors_file(root / SINGLE_FILE, None)
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        return [*problems, f"{index}: not a safetensors index ({e})"]
    for file in sorted(set(weight_map.values())):
        listed = [n for n, f in weight_map.items() if f == file]
        if not (root / file).is_file():
            problems.append(f"{root / file}: missing (the index lists {len(listed)} tensors in it)")
            continue
        problems += _safetensors_file(root / file, listed)
    return problems


def _pth_file(path: Path) -> list[str]:
    """A `.pth` archive opens, and every tensor's storage lies inside it."""
    try:
        pth = PthFile(path)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for name in pth.names():
        try:
            pth.array(name)
        except CheckpointError as e:
            problems.append(str(e))
    return problems


def _meta(root: Path) -> list[str]:
    problems = _json_problem(root / "params.json")
    for path in sorted(p for p in root.iterdir() if META_SHARD.match(p.name)):
        problems += _pth_file(path)
    return problems


def _orbax(root: Path) -> list[str]:
    """The export's config, and the Orbax metadata and OCDBT manifest of its parameters."""
    try:
        orbax_io.read_config(root)
        problems = []
    except CheckpointError as e:
        problems = [str(e)]
    params = root / orbax_io.PARAMS_DIR
    problems += _json_problem(params / "_METADATA")
    if not (params / "manifest.ocdbt").is_file():
        problems.append(f"{params / 'manifest.ocdbt'}: missing")
    return problems


_CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "run": _run,
    "hf": _hf,
    "meta": _meta,
    "orbax": _orbax,
}


def verify(path: str | Path) -> tuple[str, Path, list[str]]:
    """(layout, directory, one line per problem found) of the checkpoint at `path`."""
    kind, root = detect_layout(path)
    return kind, root, _CHECKS[kind](root)
