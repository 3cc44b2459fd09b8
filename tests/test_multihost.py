"""A real two-process job on this machine (coordinator on 127.0.0.1, 2 processes x 4 CPU devices,
gloo collectives, DCN over processes) trains like the single-process 8-device run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import multihost_worker
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 120

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path: Path, mesh_spec: str) -> tuple[list[subprocess.Popen], list[Path]]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(ROOT),
    }
    port = str(_free_port())
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), "2", port, mesh_spec, str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    return procs, outs


def _collect(procs: list[subprocess.Popen], outs: list[Path]) -> list[dict[str, np.ndarray]]:
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [dict(np.load(o)) for o in outs]


def test_two_processes_match_one_process_on_eight_devices(tmp_path):
    procs, outs = _spawn(tmp_path, "data=2:dcn,fsdp=-1")
    try:
        reference = multihost_worker.train("data=2,fsdp=-1")  # while the job runs
    finally:
        processes = _collect(procs, outs)
    half = multihost_worker.BATCH // 2
    assert [tuple(r["rows"]) for r in processes] == [(0, half), (half, 2 * half)]
    assert tuple(reference["rows"]) == (0, 2 * half)
    for result in processes:
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
        scale = float(np.max(np.abs(reference["params"])))
        np.testing.assert_allclose(result["params"], reference["params"], atol=1e-5 * scale)
    assert np.all(np.diff(reference["losses"]) < 0)
