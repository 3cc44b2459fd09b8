"""The command-line tools start quietly on a machine without a TPU, libtpu installed or not:
no libtpu initialisation errors, no Orbax warnings about a read-only directory."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.platforms import present_platforms

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("E0000", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "absl", "read only")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """A CLI run as a user starts it: no JAX_PLATFORMS, so the tool picks the platform."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_no_tpu_here_means_the_cpu():
    assert present_platforms() == "cpu"


@pytest.mark.slow
def test_train_and_infer_start_quietly_with_libtpu_installed(tmp_path):
    assert importlib.util.find_spec("libtpu") is not None, "the tpu extra is what this tests"
    run_dir = tmp_path / "run"
    train = _cli("llama_jax.train", "--config", "tiny-arithmetic", "--steps", "2",
                 "--batch", "2", "--seq-len", "64", "--checkpoint-dir", str(run_dir))  # fmt: skip
    assert train.returncode == 0, train.stderr
    infer = _cli("llama_jax.infer", "--checkpoint", str(run_dir), "--prompt-ids", "1",
                 "--max-new-tokens", "2")  # fmt: skip
    assert infer.returncode == 0, infer.stderr
    assert len(infer.stdout.splitlines()) == 1  # the run's byte tokenizer decodes the 2 ids
    for done in (train, infer):
        noisy = [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)]
        assert not noisy, noisy
