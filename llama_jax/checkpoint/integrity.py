"""Checksum manifests of training checkpoint steps: written last, checked before a step is used.

Orbax makes a step appear at once: it writes into `<step>.orbax-checkpoint-tmp`, adds its
commit record (`commit_success.txt`, the commit time in `_CHECKPOINT_METADATA`) and renames the
directory (`AtomicRenameTemporaryPath`); a manager opened with `cleanup_tmp_directories` deletes
the temporary directories a crash leaves. It neither syncs the files to disk nor checks them
later, so a renamed step can still be wrong: cut short by a machine crash before the page cache
reached the disk, damaged in storage or in a copy.

So each step gets a manifest of the size and SHA-256 of its files, renamed into place last. It
is written twice: in the temporary directory once every item is final, leaving out Orbax's
commit record (`COMMIT_RECORD`), so that Orbax's rename publishes the step and its manifest
together; then, once the step is committed, completed with the commit record. A step without a
manifest (a save cut short) is never used in a directory holding `MARKER` (written when a run
starts its checkpoints); in one written before manifests existed, or by plain Orbax, such steps
are taken unchecked. There is no fsync: a file that never reached the disk fails its check like
any damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from llama_jax.checkpoint.errors import CheckpointError

MANIFEST = "llama_jax_manifest.json"
FORMAT = "llama_jax.manifest.v1"
MARKER = "llama_jax_manifests.json"  # in `checkpoints/`: every step here has a manifest
# What Orbax writes into a step while committing it, after every item is final.
COMMIT_RECORD = frozenset({"commit_success.txt", "_CHECKPOINT_METADATA"})
_CHUNK = 16 << 20
_THREADS = min(8, os.cpu_count() or 1)  # hashlib drops the GIL: files hash in parallel
# Manifests of steps that passed in this process, with the manifest's (inode, mtime, size):
# a resume reads the config and then the state of one step, and hashes it once.
_PASSED: set[tuple[str, int, int, int]] = set()


def saved_steps(root: Path) -> list[int]:
    """The steps under a run's `checkpoints/` directory, oldest first (Orbax's temporary and
    moved-aside directories have names that are not numbers)."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def require_manifests(root: Path) -> None:
    """Mark a run's new `checkpoints/` directory: a step of it without a manifest is a save
    cut short."""
    (root / MARKER).write_text(json.dumps({"format": FORMAT}) + "\n")


def manifests_required(root: Path) -> bool:
    return (root / MARKER).is_file()


def _files(step_dir: Path) -> list[str]:
    """Every file of a step but the manifest, as sorted paths relative to the step."""
    return sorted(
        p.relative_to(step_dir).as_posix()
        for p in step_dir.rglob("*")
        if p.is_file() and not p.name.startswith(MANIFEST)
    )


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _digests(step_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(lambda name: _digest(step_dir / name), names))


def write_manifest(step_dir: Path, leave_out: frozenset[str] = frozenset()) -> None:
    """Record every file of a step but `leave_out`, then rename the manifest into place (a
    crash before that leaves the step without one, which is never resumed). Files an earlier
    manifest of the step records are not read again."""
    known = _read_manifest(step_dir) if (step_dir / MANIFEST).is_file() else {}
    names = [n for n in _files(step_dir) if n not in leave_out]
    new = [n for n in names if n not in known]
    files = {**known, **dict(zip(new, _digests(step_dir, new), strict=True))}
    payload = {"format": FORMAT, "files": {n: files[n] for n in names}}
    partial = step_dir / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(partial, step_dir / MANIFEST)


def _read_manifest(step_dir: Path) -> dict[str, dict[str, Any]]:
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{MANIFEST} missing (a save cut short)")
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r} is not {FORMAT!r}")
        return dict(payload["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{MANIFEST} unreadable ({e})") from None


def _file_problem(name: str, want: dict[str, Any], got: dict[str, Any]) -> str:
    if got["size"] != want["size"]:
        kind = "truncated" if got["size"] < want["size"] else "grown"
        return f"{name}: {got['size']} bytes, {want['size']} in the manifest ({kind})"
    return f"{name}: contents differ from the manifest's SHA-256 (damaged)"


def step_problems(step_dir: Path) -> list[str]:
    """What is wrong with a step's files (`<file>: <what>`), empty when all match the manifest
    (or when it has none and its directory predates manifests)."""
    if not (step_dir / MANIFEST).exists() and not manifests_required(step_dir.parent):
        return []
    try:
        manifest = _read_manifest(step_dir)
    except CheckpointError as e:
        return [str(e)]
    stat = (step_dir / MANIFEST).stat()
    key = (str(step_dir.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key in _PASSED:
        return []
    present = [name for name in manifest if (step_dir / name).is_file()]
    problems = [f"{name}: missing" for name in manifest if name not in present]
    for name, got in zip(present, _digests(step_dir, present), strict=True):
        if got != manifest[name]:
            problems.append(_file_problem(name, manifest[name], got))
    if not problems:
        _PASSED.add(key)
    return problems


def describe(step_dir: Path, problems: list[str]) -> str:
    """One line naming the step, its first problem and how many more there are."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"checkpoint step {step_dir.name} ({step_dir}): {problems[0]}{more}"


def check_step(step_dir: Path) -> None:
    """Raise a one-line `CheckpointError` unless the step matches its manifest."""
    problems = step_problems(step_dir)
    if problems:
        raise CheckpointError(describe(step_dir, problems))


def newest_good_step(root: Path) -> tuple[int | None, list[tuple[int, str]]]:
    """(the newest step of `root` that matches its manifest, and for each newer step the line
    saying what is wrong with it). None only when no step exists; when steps exist but none is
    good, a one-line `CheckpointError` naming the directory."""
    damaged: list[tuple[int, str]] = []
    for step in reversed(saved_steps(root)):
        problems = step_problems(root / str(step))
        if not problems:
            return step, damaged
        damaged.append((step, describe(root / str(step), problems)))
    if damaged:
        raise CheckpointError(
            f"{root}: no checkpoint step matches its manifest (newest: {damaged[0][1]}); "
            "move the directory aside to start afresh"
        )
    return None, damaged


def report(line: str) -> None:
    """A damaged step, said once per job (by process 0), on stderr."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
