"""The persistent compilation cache of the command-line tools (`llama_jax.compile_cache`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from llama_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def test_cache_directory_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.default_dir() == tmp_path / "xdg" / "llama_jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "OFF")
    assert compile_cache.default_dir() is None
    assert compile_cache.enable() is None  # disabled: JAX's configuration is left alone


def _generate(stories: Path, cache: Path) -> tuple[list[int], set[Path]]:
    cmd = [sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(stories / "hf"),
           "--prompt-ids", "1", "--max-new-tokens", "64", "--json"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", compile_cache.ENV: str(cache)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["generated_ids"], set(cache.rglob("*"))


def test_a_second_start_reuses_the_first_ones_executables(shared_assets, tmp_path):
    stories = shared_assets / "stories260K"
    expected = json.loads((stories / "expected" / "greedy_from_bos.json").read_text())
    cache = tmp_path / "xla"
    first_ids, first_files = _generate(stories, cache)
    assert first_files, "the first start wrote no executables"
    second_ids, second_files = _generate(stories, cache)
    assert second_files == first_files  # nothing compiled anew
    assert first_ids == second_ids == expected["tokens"][1:65]
