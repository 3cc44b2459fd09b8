"""Multi-host serving for real: two `serve` processes x 4 CPU devices (coordinator on
127.0.0.1, gloo collectives) hold one model on an 8-device mesh; process 0 answers HTTP with
the greedy tokens one process over 8 devices generates, and a process that dies takes it
down with one line, not a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=4,tensor=2"  # slots split over both processes' devices, heads within each
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(1, 512, n)] for i, n in
           enumerate((3, 21, 40))]  # fmt: skip
NEW_TOKENS = 8
# One block per sequence and 16-token chunks: few distinct shapes, so few compiles.
SHAPES = ("--block-size", "128", "--prefill-chunk", "16")
HEARTBEAT_TIMEOUT = 3
STARTUP = 180  # seconds, for two processes compiling on two shared cores

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path: Path, http_port: int) -> tuple[list[subprocess.Popen], list[Path]]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "LLAMA_JAX_COMPILE_CACHE": "off",
        "PYTHONPATH": str(ROOT),
    }
    coordinator = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "llama_jax.infer", "serve", "--preset", "tiny",
                 "--mesh", MESH, "--max-batch", "4", "--max-seq-len", "128", "--quiet",
                 *SHAPES,
                 "--port", str(http_port), "--coordinator", coordinator,
                 "--num-processes", "2", "--process-id", str(i),
                 "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            ))  # fmt: skip
    return procs, logs


def _wait_ready(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"not ready after {STARTUP}s:\n{logs[0].read_text()[-3000:]}")


def _complete(url: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy token ids (read off the log-prob listing: without a tokenizer a token shows as
    `<id>`) and their log-probs."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "logprobs": 0}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        choice = json.load(r)["choices"][0]
    listing = choice["logprobs"]
    return [int(t.strip("<>")) for t in listing["tokens"]], listing["token_logprobs"]


def _reference() -> list[tuple[list[int], list[float]]]:
    """The same model (seeded init) over this process's 8 devices."""
    from llama_jax.api import init
    from llama_jax.config import preset
    from sharding.mesh import make_mesh
    from sharding.place import place

    config = preset("tiny")
    model, mesh = init(config), make_mesh(MESH)
    model.params, model.mesh = place(model.params, config, mesh, "infer_tp"), mesh
    out = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS, logprobs=True)
    return [(c.token_ids, c.logprobs) for c in out]


def test_two_processes_serve_like_one_and_stop_when_process_1_dies(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs, logs = _spawn(tmp_path, port)
    try:
        reference = _reference()  # while the job starts
        _wait_ready(url, procs, logs)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together in the scheduler
            served = list(pool.map(lambda p: _complete(url, p), PROMPTS))
        for (ids, lps), (ref_ids, ref_lps) in zip(served, reference, strict=True):
            assert len(ids) == NEW_TOKENS and ids == ref_ids
            np.testing.assert_allclose(lps, ref_lps, atol=1e-4)

        procs[1].kill()
        killed = time.monotonic()
        procs[0].wait(timeout=HEARTBEAT_TIMEOUT + 30)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = logs[0].read_text()
    line = "llama_jax serve: process 1 stopped responding; shutting down"
    assert procs[0].returncode == 1, log[-3000:]
    assert log.count(line) == 1 and log.rstrip().endswith(line), log[-3000:]
    assert "Traceback" not in log, log[-3000:]  # a step cut short is blamed on the lost process
    assert took < HEARTBEAT_TIMEOUT + 15
