"""Reliability: silent data corruption checks (recomputation on other devices, replica
checksums), the hang watchdog, and bad training data (skipped and counted, or failing with its
FILE:LINE)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from synthetic import arithmetic_jsonl

from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train import main
from sharding.mesh import make_mesh
from train import loop, sdc, watchdog
from train.config import TrainConfigError, load_config
from train.corpus import documents
from train.data import SKIPPED, DataConfig, DataError, DocumentSource, make_dataset
from train.loop import run, setup, train
from train.sdc import SilentDataCorruption, check_replicas, rotated_mesh

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=4"  # every weight has two data-parallel replicas
BYTES = ByteTokenizer()


def _settings(paths: list[Path], **overrides) -> dict:
    """A tiny float32 run (byte tokenizer) on `paths`."""
    base = {
        "model": "tiny",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"paths": [str(p) for p in paths], "seq_len": 64, "batch": 8, "tokenizer": "bytes"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "steps": 6,
        "mesh": MESH,
        "log_every": 1,
        "peak_tflops": 1.0,
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arithmetic.jsonl", 2000)


def _bumped(x: jax.Array, device: jax.Device) -> jax.Array:
    """`x` with `device`'s buffer changed by a small amount: a fault of that device alone."""
    shards = [s.data + 1e-3 if s.device == device else s.data for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)


def _faulty(step_fn: Callable, at_step: int, device: jax.Device) -> Callable:
    """`step_fn` whose update `at_step` comes out wrong on `device` (its shard of the output
    head's weights, i.e. of that weight's gradient step)."""

    def step(state, batch, frozen):
        state, metrics = step_fn(state, batch, frozen)
        if int(state.step) == at_step:
            params = {**state.params, "output": _bumped(state.params["output"], device)}
            state = state._replace(params=params)
        return state, metrics

    return step


# --- silent data corruption ------------------------------------------------------------------


def test_rotated_mesh_moves_every_position_to_another_device():
    mesh = make_mesh(MESH)
    other = rotated_mesh(mesh)
    assert other.shape == mesh.shape
    assert sorted(d.id for d in other.devices.flat) == list(range(8))
    assert all(a != b for a, b in zip(mesh.devices.flat, other.devices.flat, strict=True))


@pytest.mark.slow
def test_sdc_check_passes_50_fault_free_steps(corpus):
    result = run(load_config(None, _settings([corpus], steps=50, sdc_check_every=1, log_every=10)))
    assert int(result.state.step) == 50
    assert np.isfinite(result.last_metrics["loss"])


def test_sdc_check_names_the_step_and_device_of_a_corrupted_update(corpus):
    t = setup(load_config(None, _settings([corpus], sdc_check_every=2)))
    faulty = jax.devices()[5]
    t.step_fn = _faulty(t.step_fn, at_step=4, device=faulty)
    with pytest.raises(SilentDataCorruption) as e:
        train(t)
    message = str(e.value)
    assert message.startswith("step 4: silent data corruption: .params['output'] slice")
    assert f"on {faulty} differs from its recomputation on" in message


def test_replica_checksums_name_the_device_whose_replica_differs():
    mesh = make_mesh(MESH)
    w = jax.device_put(jnp.arange(32.0).reshape(4, 8), NamedSharding(mesh, PartitionSpec("fsdp")))
    state = {"w": w, "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, PartitionSpec()))}
    check_replicas(3, state)  # healthy: no error
    faulty = mesh.devices.flat[6]  # data index 1: its twin holds the same rows on data index 0
    with pytest.raises(SilentDataCorruption) as e:
        check_replicas(3, {**state, "w": _bumped(w, faulty)})
    message = str(e.value)
    twin = mesh.devices[0, 2, 0]
    assert message.startswith("after step 3: silent data corruption: the replicas of ['w'] slice")
    assert f"{twin}: 0x" in message and f"{faulty}: 0x" in message


def test_cli_exits_75_with_one_line_on_corruption(corpus, tmp_path, capsys, monkeypatch):
    def faulty_setup(cfg, devices=None):
        t = setup(cfg, devices)
        t.step_fn = _faulty(t.step_fn, at_step=2, device=jax.devices()[1])
        return t

    monkeypatch.setattr(loop, "setup", faulty_setup)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_settings([corpus])))
    code = main(["--config", str(config), "--sdc-check-every", "2"])
    assert code == sdc.EXIT_CODE == 75
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: step 2: silent data corruption")


# --- watchdog --------------------------------------------------------------------------------

SLOW_RUN = """
import sys, time
from train import loop, watchdog
watchdog.MIN_SECONDS = 1.0
step = loop.Trainer.step
def slow_step(self, n):
    if n == 9:
        time.sleep(120)
    return step(self, n)
loop.Trainer.step = slow_step
from llama_jax.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_watchdog_dumps_stacks_and_exits_76_on_a_hung_step(corpus, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_settings([corpus], steps=20, mesh="fsdp=-1")))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-c", SLOW_RUN, "--config", str(config), "--watchdog-multiple", "5"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == watchdog.EXIT_CODE == 76, proc.stderr[-2000:]
    assert "Current thread" in proc.stderr and "in slow_step" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: watchdog: no step finished for")
    assert last.endswith("(5 x the median step time); stacks above; exiting 76")


def test_watchdog_waits_for_warmup_scales_with_the_steps_per_report_and_pauses(monkeypatch):
    monkeypatch.setattr(watchdog, "MIN_SECONDS", 0.0)
    clock = iter([0.0, 1.0, 3.0, 4.0, 104.0, 105.0, 1105.0])
    dog = watchdog.Watchdog(multiple=10, warmup=4, poll_seconds=3600, clock=lambda: next(clock))
    try:
        dog.progress(1)  # t=0: the compiling step, not timed
        dog.progress(1)  # t=1: 1 s per step
        assert dog.limit() is None  # 1 step timed, warm-up is 4
        dog.progress(2)  # t=3: 1 s per step
        dog.progress(1)  # t=4: 1 s per step, 4 steps timed
        assert dog.limit() == 10 * 1.0 * 2  # median 1 s, reports of up to 2 steps
        dog.progress(1)  # t=104: a 100 s step
        assert dog.limit() == 20.0  # the median is robust to it
        with dog.paused():  # ends at t=105
            assert dog.limit() is None
        dog.progress(1)  # t=1105: covers the pause, so it is no sample
        assert dog.limit() == 20.0
        monkeypatch.setattr(watchdog, "MIN_SECONDS", 30.0)
        assert dog.limit() == 30.0
    finally:
        dog.close()


# --- bad data --------------------------------------------------------------------------------


@pytest.fixture()
def bad_data(tmp_path: Path) -> list[Path]:
    """Good documents, a JSONL whose line 3 is malformed and a text file that is not UTF-8 on
    line 2."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(d) + "\n" for d in documents(40, seed=1)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1=2"}\n{"text": "2+2=4"}\n{"text": "3+3=\n{"text": "4+4=8"}\n')
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    return [good, bad, latin]


def test_bad_data_skip_trains_and_counts_each_skip(bad_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    before = SKIPPED.count
    cfg = _settings(bad_data, data={"bad_data": "skip"}, checkpoint_dir=str(run_dir))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        result = run(load_config(None, cfg))
    assert int(result.state.step) == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counted = sum(r["skipped_documents"] for r in rows)
    assert counted == SKIPPED.count - before
    assert counted >= 2 * 2  # both bad documents, in every epoch read (about 15 epochs)
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "train.data")
    assert len(warnings) == 2  # once per bad line, however often it comes round
    assert warnings[0].startswith(f"skipping a bad document: {bad_data[1]}:3: not valid JSON")
    assert warnings[1].startswith(f"skipping a bad document: {bad_data[2]}:2: not valid UTF-8")


@pytest.mark.parametrize(
    ("bad", "line", "why"), [(1, 3, "not valid JSON"), (2, 2, "not valid UTF-8")]
)
def test_bad_data_fail_stops_with_one_line_naming_file_and_line(
    bad_data, tmp_path, capsys, bad, line, why
):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_settings([bad_data[0], bad_data[bad]])))
    assert main(["--config", str(config)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad_data[bad]}:{line}: {why}")


def test_skipping_pipeline_is_deterministic_and_resumes_exactly(bad_data):
    cfg = DataConfig(seq_len=64, batch=4, tokenizer="bytes", bad_data="skip")

    def batches() -> Iterator:
        return iter(make_dataset(DocumentSource([str(p) for p in bad_data]), BYTES, cfg, seed=3))

    before = SKIPPED.count
    first = batches()
    head = [next(first) for _ in range(4)]
    state = first.get_state()
    tail = [next(first) for _ in range(4)]
    assert SKIPPED.count > before
    resumed = batches()
    resumed.set_state(state)
    for expected, got in zip(tail, (next(resumed) for _ in tail), strict=True):
        assert all(np.array_equal(expected[k], got[k]) for k in expected)
    again = batches()
    for expected, got in zip(head, (next(again) for _ in head), strict=True):
        assert all(np.array_equal(expected[k], got[k]) for k in expected)
    ids = np.concatenate([b["tokens"].ravel() for b in head + tail])
    text = bytes(ids[ids < 256].astype(np.uint8))  # byte ids are the bytes
    assert b"=" in text and b"first line" not in text and b"lait" not in text


def test_bad_settings_are_one_line_errors(bad_data):
    with pytest.raises(DataError, match=r"--bad-data 'drop': expected one of fail, skip"):
        run(load_config(None, _settings(bad_data, data={"bad_data": "drop"})))
    with pytest.raises(TrainConfigError, match=r"watchdog_multiple -1.0: must be >= 0"):
        load_config(None, {"watchdog_multiple": -1})
