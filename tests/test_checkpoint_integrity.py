"""Checkpoint integrity: every step's checksum manifest, resume and `llama_jax.load` falling back
past a damaged or unfinished step (bit-exact with an uninterrupted run), saves that fail or are
killed at each point of an asynchronous save, and `convert --verify` on each layout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from synthetic import arithmetic_jsonl
from test_train import ROOT, STEPS, _settings

from llama_jax.api import Model
from llama_jax.checkpoint import integrity
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.run_dir import load_run_params
from llama_jax.config import preset
from llama_jax.convert import main as convert_main
from llama_jax.model import init_params
from train.checkpoint import RunCheckpointer
from train.config import load_config
from train.loop import run

SAVE_EVERY = 5  # steps 5, 10, 15 and 20 are saved, and all are kept


def _run_settings(corpus: Path, run_dir: Path) -> dict:
    return _settings(corpus, checkpoint_dir=str(run_dir), save_every=SAVE_EVERY, keep=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arithmetic.jsonl", 3000)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run: 20 steps, every fifth saved with its manifest."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(load_config(None, _run_settings(corpus, run_dir)))
    return run_dir


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / str(step)


def _params(path: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(load_run_params(path)[1])]


def _assert_bit_exact(got: Path, want: Path) -> None:
    for a, b in zip(_params(got), _params(want), strict=True):
        np.testing.assert_array_equal(a, b)


def _largest_array_file(step_dir: Path) -> Path:
    files = (step_dir / "params").rglob("ocdbt.process_0/d/*")
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _array_damaged(step_dir: Path, hurt: Callable[[Path], None]) -> str:
    """Damage the step's largest parameter file; its path relative to the step."""
    path = _largest_array_file(step_dir)
    hurt(path)
    return path.relative_to(step_dir).as_posix()


def _manifest_removed(step_dir: Path) -> str:
    (step_dir / integrity.MANIFEST).unlink()
    return integrity.MANIFEST


# Each damage: what damages a step (returning the file it hurt) and what its report says.
DAMAGE: dict[str, tuple[Callable[[Path], str], str]] = {
    "flipped byte": (partial(_array_damaged, hurt=_flip_byte), "contents differ"),
    "truncated": (partial(_array_damaged, hurt=_truncate), "(truncated)"),
    "missing file": (partial(_array_damaged, hurt=Path.unlink), ": missing"),
    "no manifest": (_manifest_removed, "missing (a save cut short)"),
}


def _damage(step_dir: Path, kind: str) -> str:
    return DAMAGE[kind][0](step_dir)


def _report_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("checkpoint step ")]


def test_every_saved_step_has_a_manifest_of_all_its_files(reference):
    checkpoints = reference / "checkpoints"
    assert integrity.saved_steps(checkpoints) == [5, 10, 15, 20]
    for step in integrity.saved_steps(checkpoints):
        step_dir = checkpoints / str(step)
        manifest = json.loads((step_dir / integrity.MANIFEST).read_text())
        files = {
            p.relative_to(step_dir).as_posix()
            for p in step_dir.rglob("*")
            if p.is_file() and p.name != integrity.MANIFEST
        }
        assert set(manifest["files"]) == files and files >= integrity.COMMIT_RECORD
        assert manifest["files"]["commit_success.txt"]["size"] == len(
            (step_dir / "commit_success.txt").read_bytes()
        )
        assert integrity.step_problems(step_dir) == []


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_reports_a_damaged_latest_step_and_redoes_it_from_the_previous(
    kind, corpus, reference, tmp_path, capfd
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    named = _damage(_step_dir(run_dir, STEPS), kind)
    capfd.readouterr()

    result = run(load_config(None, _run_settings(corpus, run_dir)))

    lines = _report_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    want = f"checkpoint step {STEPS} ({_step_dir(run_dir, STEPS).resolve()}): {named}"
    assert lines[0].startswith(want), lines[0]
    assert DAMAGE[kind][1] in lines[0]
    assert lines[0].endswith(f"moved to {STEPS}.damaged, resuming from step {STEPS - SAVE_EVERY}")
    assert int(result.state.step) == STEPS
    assert (run_dir / "checkpoints" / f"{STEPS}.damaged").is_dir()
    assert integrity.step_problems(_step_dir(run_dir, STEPS).resolve()) == []
    _assert_bit_exact(run_dir, reference)


def test_load_reads_the_newest_good_step_and_refuses_a_damaged_one_named(
    reference, tmp_path, capfd
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    named = _damage(_step_dir(run_dir, STEPS), "flipped byte")
    capfd.readouterr()
    _assert_bit_exact(run_dir, _step_dir(reference, STEPS - SAVE_EVERY))
    (line,) = _report_lines(capfd.readouterr().err)
    assert f"{named}: contents differ" in line and line.endswith(f"reading step {STEPS - 5}")
    with pytest.raises(CheckpointError, match=rf"step {STEPS} .*{named}: contents differ"):
        load_run_params(_step_dir(run_dir, STEPS))


def test_no_good_step_stops_with_one_line_naming_the_directory(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        _damage(_step_dir(run_dir, step), "no manifest")
    checkpoints = (run_dir / "checkpoints").resolve()
    with pytest.raises(CheckpointError) as error:
        run(load_config(None, _run_settings(corpus, run_dir)))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{checkpoints}: no checkpoint step matches its manifest")
    assert integrity.saved_steps(checkpoints) == [5, 10, 15, 20]  # nothing moved, nothing lost


TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N into `N.orbax-checkpoint-tmp`, then renames it


def _fail_orbax_rename(monkeypatch, step: int) -> None:
    """A full disk while Orbax commits `step`: the error comes before its rename."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == str(step):
            raise OSError(28, "No space left on device")
        await original(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def _fail_manifest(directory: str) -> Callable[[pytest.MonkeyPatch, int], None]:
    """A full disk while the manifest of `step` is written into `directory` (its temporary
    directory, or the step once committed)."""

    def fail(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
        original = integrity.write_manifest

        def write_manifest(step_dir: Path, *args) -> None:
            if step_dir.name == directory.format(step=step):
                raise OSError(28, "No space left on device")
            original(step_dir, *args)

        monkeypatch.setattr(integrity, "write_manifest", write_manifest)

    return fail


@pytest.mark.parametrize(
    "fail",
    [_fail_orbax_rename, _fail_manifest("{step}" + TMP), _fail_manifest("{step}")],
    ids=["orbax-commit", "manifest-in-tmp", "manifest-completion"],
)
def test_a_failed_save_stops_with_one_line_and_never_leaves_a_wrong_step(
    fail, corpus, reference, tmp_path, monkeypatch, capfd
):
    """Failed before the rename, the step never appears (Orbax deletes its temporary directory
    on start) and is redone; failed after it, the step has its manifest (without Orbax's
    commit record in it) and is resumed."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail(patch, STEPS)
        with pytest.raises(CheckpointError) as error:
            run(load_config(None, _run_settings(corpus, run_dir)))
    assert str(error.value).startswith(f"checkpoint step {STEPS} in ")
    assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
    capfd.readouterr()
    run(load_config(None, _run_settings(corpus, run_dir)))
    assert _report_lines(capfd.readouterr().err) == []
    _assert_bit_exact(run_dir, reference)


# --- kill -9 during an asynchronous save --------------------------------------------------------

# Runs the training CLI, killing itself (-9) when argv[1] is reached for directory argv[2]: Orbax
# renaming it ("rename"), a manifest being written into it ("manifest") or renamed into place
# there ("replace").
KILLER = """
import os, signal, sys
from pathlib import Path
point, directory = sys.argv[1], sys.argv[2]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "rename":
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    original_finalize = cls.finalize

    async def finalize(self):
        if self.get_final().name == directory:
            die()
        await original_finalize(self)

    cls.finalize = finalize
elif point == "manifest":
    from llama_jax.checkpoint import integrity

    original_write = integrity.write_manifest

    def write_manifest(step_dir, *args):
        if step_dir.name == directory:
            die()
        original_write(step_dir, *args)

    integrity.write_manifest = write_manifest
elif point == "replace":
    original_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "llama_jax_manifest.json" and Path(dst).parent.name == directory:
            die()
        original_replace(src, dst)

    os.replace = replace

from llama_jax.train import main

sys.exit(main(sys.argv[3:]))
"""


def _killed_run(corpus: Path, run_dir: Path, point: str, directory: str) -> None:
    """A training run in a subprocess, killed (-9) at `point` of the save into `directory`: by
    itself at a hooked point, or ("while-writing") by this test as soon as `directory` (or its
    temporary directory) appears."""
    config = run_dir.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(_run_settings(corpus, run_dir)))
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    cmd = [sys.executable, "-c", KILLER, point, directory, "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if point == "while-writing":
        checkpoints, deadline = run_dir / "checkpoints", time.monotonic() + 300
        while not (checkpoints.is_dir() and any(checkpoints.glob(f"{directory}*"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.001)
        proc.kill()
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


KILLED = 2 * SAVE_EVERY  # the step whose save is killed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "directory", "resumed"),
    [
        ("while-writing", f"{KILLED}", None),  # the step or the one before
        ("manifest", f"{KILLED}{TMP}", KILLED - SAVE_EVERY),
        ("replace", f"{KILLED}{TMP}", KILLED - SAVE_EVERY),
        ("rename", f"{KILLED}", KILLED - SAVE_EVERY),
        ("manifest", f"{KILLED}", KILLED),  # renamed with its manifest, before completing it
        ("replace", f"{KILLED}", KILLED),
    ],
)
def test_kill9_during_an_async_save_never_leaves_a_wrong_resumable_step(
    point, directory, resumed, corpus, reference, tmp_path
):
    run_dir = tmp_path / "run"
    _killed_run(corpus, run_dir, point, directory)
    resumable = RunCheckpointer(run_dir, keep=10).resumable_step()
    assert resumable in (KILLED - SAVE_EVERY, KILLED) if resumed is None else resumable == resumed
    _assert_bit_exact(_step_dir(run_dir, resumable), _step_dir(reference, resumable))
    run(load_config(None, _run_settings(corpus, run_dir)))
    _assert_bit_exact(run_dir, reference)


# --- convert --verify -------------------------------------------------------------------------


def _verify(path: Path, capsys) -> tuple[int, list[str]]:
    code = convert_main(["--verify", str(path)])
    return code, capsys.readouterr().out.splitlines()


def test_verify_a_run_directory(reference, tmp_path, capsys):
    assert _verify(reference, capsys) == (
        0,
        [f"{reference}: run checkpoint, no problems found"],
    )
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    named = _damage(_step_dir(run_dir, STEPS), "truncated")
    _damage(_step_dir(run_dir, SAVE_EVERY), "no manifest")
    code, lines = _verify(run_dir, capsys)
    checkpoints = run_dir / "checkpoints"
    assert code == 1
    assert lines[0] == f"{checkpoints / '5'}/{integrity.MANIFEST} missing (a save cut short)"
    assert lines[1].startswith(f"{checkpoints / str(STEPS)}/{named}: ")
    assert lines[1].endswith("in the manifest (truncated)")
    assert lines[2:] == [f"{run_dir}: run checkpoint, 2 problem(s) found"]


@pytest.fixture(scope="module")
def tiny_model() -> Model:
    config = preset("tiny")
    return Model(config, jax.jit(lambda: init_params(config, 0))())


def test_verify_hf_meta_and_orbax_exports(tiny_model, tmp_path, capsys):
    for to in ("hf", "meta", "orbax"):
        out = export(tiny_model, tmp_path / to, to, max_shard_bytes=200_000)
        assert _verify(out, capsys) == (0, [f"{out}: {to} checkpoint, no problems found"])

    hf = tmp_path / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    first, second = sorted(set(index.values()))[:2]
    _truncate(hf / first)
    (hf / second).unlink()
    code, lines = _verify(hf, capsys)
    assert code == 1 and len(lines) == 3, lines
    assert lines[0].startswith(f"{hf / first}: tensor ") and "truncated file?" in lines[0]
    assert lines[1].startswith(f"{hf / second}: missing (the index lists ")
    assert lines[2] == f"{hf}: hf checkpoint, 2 problem(s) found"

    meta = tmp_path / "meta"
    _truncate(meta / "consolidated.00.pth")
    code, lines = _verify(meta, capsys)
    assert code == 1 and lines[-1] == f"{meta}: meta checkpoint, 1 problem(s) found", lines
    assert lines[0].startswith(f"{meta / 'consolidated.00.pth'}: unreadable zip archive")
