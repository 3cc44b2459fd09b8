"""Training: the step (packing, accumulation, dtypes, optimizer), loss on the built-in corpus,
mesh parity, exact resume after kill -9 and SIGTERM, resume on another mesh, non-finite stop,
starting from a checkpoint, config and CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from synthetic import arithmetic_jsonl

from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.run_dir import load_run_params
from llama_jax.config import preset
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train import FLAGS, parse_args, parser
from llama_jax.xla_cpu import train_step_options
from train.config import TrainConfigError, load_config
from train.data import pack_examples, tokenize_document
from train.loop import NonFiniteLoss, run
from train.metrics import flops_per_token, peak_flops_per_device
from train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule
from train.step import Policy, build_train_step, init_train_state, lm_objective

ROOT = Path(__file__).resolve().parents[1]
TINY = preset("tiny")
STEPS = 20


def _settings(corpus: Path, **overrides) -> dict:
    """A tiny float32 run on the built-in corpus (byte tokenizer: the tiny vocab is 512)."""
    base = {
        "model": "tiny",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"paths": [str(corpus)], "seq_len": 64, "batch": 8, "tokenizer": "bytes"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "steps": STEPS,
        "mesh": "fsdp=-1",
        "save_every": 10,
        "log_every": 5,
        "peak_tflops": 1.0,  # skip measuring the CPU: not what these tests check
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The built-in corpus written out as JSONL (so the file reader is what runs)."""
    return arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arithmetic.jsonl", 3000)


@pytest.fixture(scope="module")
def fsdp8_run(corpus, tmp_path_factory) -> Path:
    """20 steps on the emulated mesh fsdp=8, checkpoints at 10 and 20."""
    run_dir = tmp_path_factory.mktemp("fsdp8")
    run(load_config(None, _settings(corpus, checkpoint_dir=str(run_dir))))
    return run_dir


# --- the step ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
    """A fresh tiny train state (lr 1e-3, one warm-up step), built once."""
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1))
    return opt, jax.jit(lambda: init_train_state(TINY, opt))()


def _lm_loss(params, batch, config=TINY, loss_chunks: int = 1) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, counted tokens) of the language-model objective."""
    parts = lm_objective(Policy(config), loss_chunks)(params, {}, batch, None)
    return parts.loss_sum, parts.count


def _batch(rows: list[dict[str, np.ndarray]]) -> dict[str, jnp.ndarray]:
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_document_loss_is_the_same_alone_and_packed(tiny_state):
    import grain

    tok = ByteTokenizer()
    docs = ["7+8=15", "a longer document about packing", "9-4=5", "x"]
    examples = [tokenize_document({"text": d}, tok, sft=False) for d in docs]
    packed = next(
        iter(pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 64, 1, 0))
    )
    assert len(np.unique(packed["segment_ids"])) == len(docs) + 1  # all four plus padding
    params = tiny_state[1].params
    loss = jax.jit(lambda b: _lm_loss(params, b))
    for i, example in enumerate(examples):
        alone = next(
            iter(pack_examples(grain.MapDataset.source([example]).to_iter_dataset(), 64, 1, 0))
        )
        only_doc = dict(packed, loss_mask=packed["loss_mask"] * (packed["segment_ids"] == i + 1))
        together, n_together = loss(_batch([only_doc]))
        single, n_single = loss(_batch([alone]))
        assert n_together == n_single == len(example["tokens"])
        np.testing.assert_allclose(together, single, rtol=1e-5)


def _random_batch(b: int, t: int, seed: int = 0) -> dict[str, jnp.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 512, (b, t + 1)).astype(np.int32)
    return {
        "tokens": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "loss_mask": jnp.ones((b, t), jnp.float32),
    }


def test_gradient_accumulation_matches_one_big_batch(tiny_state):
    opt, state = tiny_state
    batch = _random_batch(8, 32)
    batch["loss_mask"] = batch["loss_mask"].at[:3, 20:].set(0.0)  # uneven counts per micro-batch
    one, m1 = jax.jit(build_train_step(TINY, opt, grad_accum=1))(state, batch)
    four, m4 = jax.jit(build_train_step(TINY, opt, grad_accum=4))(state, batch)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert m1["loss_tokens"] == m4["loss_tokens"] == 8 * 32 - 3 * 12
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # lr 1e-3: 1% of one update


def test_chunked_loss_matches_the_whole_sequence_loss(tiny_state):
    """The head and loss over 4 strided slices of the sequence: same loss, count and gradients."""
    params = tiny_state[1].params
    batch = _random_batch(4, 32)
    batch["loss_mask"] = batch["loss_mask"].at[1, 5:].set(0.0)
    grads = {}
    for chunks in (1, 4):
        fn = jax.value_and_grad(partial(_lm_loss, loss_chunks=chunks), has_aux=True)
        grads[chunks] = jax.jit(fn, static_argnums=2)(params, batch, TINY)
    (loss1, n1), g1 = grads[1]
    (loss4, n4), g4 = grads[4]
    assert n1 == n4 == 4 * 32 - 27
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"loss_chunks \(5\) must divide the sequence length 32"):
        _lm_loss(params, batch, TINY, loss_chunks=5)


def test_bf16_compute_keeps_fp32_master_weights_and_moments(tiny_state):
    config = TINY.replace(compute_dtype="bfloat16", remat="full")
    opt, state = tiny_state
    state, metrics = jax.jit(build_train_step(config, opt))(state, _random_batch(2, 16))
    assert np.isfinite(metrics["loss"])
    float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in float_leaves} == {jnp.dtype("float32")}


def test_schedule_and_weight_decay_mask(tiny_state):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = make_schedule(cfg, total_steps=100)
    np.testing.assert_allclose(
        [lr(0), lr(4), lr(9), lr(99), lr(500)], [0.1, 0.5, 1.0, 0.1, 0.1], atol=1e-6
    )
    assert lr(50) < lr(20) < 1.0

    params = tiny_state[1].params
    mask = decay_mask(params)
    assert not mask["tok_embeddings"] and not mask["norm"] and not mask["layers"]["ffn_norm"]
    assert mask["output"] and mask["layers"]["attention"]["wq"]

    no_decay = OptimConfig(lr=0.1, weight_decay=0.5, decay_norms_and_embeddings=False)
    opt = make_optimizer(no_decay)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, jax.jit(opt.init)(params), params)  # decay alone
    assert not np.any(updates["tok_embeddings"]) and not np.any(updates["layers"]["attention_norm"])
    first_lr = make_schedule(no_decay, 0)(0)
    np.testing.assert_allclose(updates["output"], -first_lr * 0.5 * params["output"], rtol=1e-4)


def test_flop_formula():
    c = TINY
    n = c.n_layers * (
        c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    )
    n += c.dim * c.vocab_size
    assert c.matmul_params() == n
    assert flops_per_token(c, 128) == 6 * n + 6 * c.n_layers * c.n_heads * c.head_dim * 128
    big = preset("llama3-8b")  # 8.03B params, of which 0.53B is the embedding gather
    norms = (2 * big.n_layers + 1) * big.dim
    assert big.matmul_params() == big.param_count() - big.vocab_size * big.dim - norms
    tied = preset("llama3.2-1b")  # the head is the embedding, and still a matmul
    norms = (2 * tied.n_layers + 1) * tied.dim
    assert tied.matmul_params() == tied.param_count() - norms


@pytest.mark.parametrize(
    ("kind", "tflops"),
    [
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v5 lite", 197),
        ("TPU v6 lite", 918),
        ("TPU v4", 275),
    ],
)
def test_peak_flops_by_the_device_kind_the_runtime_reports(kind, tflops):
    """v5p chips report "TPU v5": a prefix table that let it match v5e's entry overstated MFU."""

    class Device:
        device_kind = kind

    peak, source = peak_flops_per_device([Device()], "bfloat16", 0)
    assert (peak, source) == (tflops * 1e12, f"data sheet ({kind})")


# --- runs ----------------------------------------------------------------------------------


def test_loss_falls_on_the_builtin_corpus(fsdp8_run):
    losses = _losses(fsdp8_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < 0.5 * losses[1]
    assert list((fsdp8_run / "tensorboard").glob("events.out.tfevents.*"))


def test_fsdp8_matches_one_device(corpus, fsdp8_run, tmp_path):
    one = tmp_path / "one"
    run(load_config(None, _settings(corpus, checkpoint_dir=str(one))), devices=jax.devices()[:1])
    a, b = _losses(fsdp8_run), _losses(one)
    rel = max(abs(a[s] - b[s]) / abs(b[s]) for s in b)
    assert rel <= 1e-4, f"max relative loss difference {rel:.2e} over {STEPS} steps"


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, fsdp8_run, tmp_path):
    run_dir = tmp_path / "nan"
    shutil.copytree(fsdp8_run, run_dir)
    cfg = load_config(
        None, _settings(corpus, checkpoint_dir=str(run_dir), steps=30, optim={"lr": "inf"})
    )
    with pytest.raises(NonFiniteLoss, match=r"step 22: .*last good checkpoint: step 20"):
        run(cfg)
    assert _steps_saved(run_dir) == [10, 20]


def test_init_from_a_run_directory_and_export(corpus, fsdp8_run, tmp_path):
    exported = tmp_path / "hf"
    cfg = _settings(corpus, init_from=str(fsdp8_run), steps=0, export_dir=str(exported))
    result = run(load_config(None, cfg))
    assert int(result.state.step) == 0
    _, saved = load_run_params(fsdp8_run)
    reloaded = load(exported)
    for a, b, c in zip(
        *map(jax.tree.leaves, (result.state.params, saved, reloaded.params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def _cli(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    cmd = [
        sys.executable,
        "-m",
        "llama_jax.train",
        "--config",
        str(config),
        "--checkpoint-dir",
        str(run_dir),
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, (
            f"run ended (code {proc.returncode}) before {what}: {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline, f"no {what} after 300s"
        time.sleep(0.01)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    _wait_for(proc, lambda: (run_dir / "checkpoints" / str(step)).is_dir(), f"checkpoint {step}")


def _wait_for_row(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until metrics.jsonl holds step `step`: steps past the last checkpoint are logged."""
    path = run_dir / "metrics.jsonl"
    _wait_for(proc, lambda: path.exists() and step in _logged_steps(run_dir), f"row {step}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """The exit code and what the run printed (messages on stdout, the progress bar on stderr)."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 130, 143), err
    return proc.returncode, out + err


def _steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of `tag` that TensorBoard shows: it reads the event files in name (time) order
    and hides earlier events at or past the step of each file's SessionLog START (purge_step)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps: list[int] = []
    for path in sorted((run_dir / "tensorboard").iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            if event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_kill9_sigterm_and_ctrl_c_resume_bit_exactly_and_on_another_mesh(
    corpus, fsdp8_run, tmp_path
):
    """`fsdp8_run` is the uninterrupted reference: same settings, saves and logs at other steps
    (which changes nothing computed)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_settings(corpus, save_every=5, log_every=1)))
    broken, moved = tmp_path / "broken", tmp_path / "moved"

    proc = _cli(config, broken)
    _wait_for_checkpoint(proc, broken, 5)
    _wait_for_row(proc, broken, 7)  # steps past the checkpoint are logged, to be done again
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    shutil.copytree(broken, moved)
    resumed_from = _steps_saved(moved)[-1]
    # The checkpoint written on fsdp=8 resumes on data=2,fsdp=4 (checked below), through a
    # Ctrl-C (save, one line, exit 130) and a second resume ...
    other_mesh = _cli(config, moved, "--mesh", "data=2,fsdp=4")
    _wait_for_checkpoint(other_mesh, moved, 10)
    other_mesh.send_signal(signal.SIGINT)
    code, err = _finish(other_mesh)
    assert code == 130, "Ctrl-C should save and exit 130"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    stop = [line for line in err.splitlines() if line.startswith("SIGINT at step")]
    assert len(stop) == 1 and "rerun the same command to resume" in stop[0], err
    assert _steps_saved(moved)[-1] == int(stop[0].split()[3].rstrip(":")) < STEPS
    other_mesh = _cli(config, moved, "--mesh", "data=2,fsdp=4")

    # ... and on the same mesh, through a SIGTERM (save, exit 143) and a second resume.
    proc = _cli(config, broken)
    _wait_for_checkpoint(proc, broken, 10)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc)[0] == 143, "SIGTERM should save and exit 143"
    assert _steps_saved(broken)[-1] < STEPS
    code, err = _finish(_cli(config, broken))
    assert code == 0
    assert f"done: step {STEPS} | loss " in err and f"checkpoints in {broken.resolve()}" in err, err
    assert _finish(other_mesh)[0] == 0

    # Every step is logged once, in the JSONL and as TensorBoard shows it, despite the replays.
    for run_dir in (broken, moved):
        assert _logged_steps(run_dir) == list(range(1, STEPS + 1))
        assert sorted(_tensorboard_steps(run_dir, "train/loss")) == list(range(1, STEPS + 1))

    _, want = load_run_params(fsdp8_run)
    _, got = load_run_params(broken)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)

    a, b = _losses(fsdp8_run), _losses(moved)
    rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in range(resumed_from + 1, STEPS + 1))
    assert rel <= 1e-4, f"max relative loss difference {rel:.2e} after the move"
    _, elsewhere = load_run_params(moved)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(elsewhere), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


def test_a_second_ctrl_c_exits_at_once_without_saving():
    """The first Ctrl-C asks the loop to save and stop; the second ends the process at once."""
    script = (
        "import os, signal, time\n"
        "from train.checkpoint import StopWatch\n"
        "watch = StopWatch()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.1)\n"
        "print('first', watch.reached(1, None), watch.signal == signal.SIGINT, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not reached')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 130, done.stderr
    assert done.stdout.split() == ["first", "True", "True"]
    assert done.stderr.strip() == "second Ctrl-C: stopped without saving"


# --- config and CLI ------------------------------------------------------------------------


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nsteps: 7\noptim: {lr: 1e-3}\ndata: {seq_len: 32, paths: a.txt}\n")
    cfg = load_config(str(path), {"steps": 9, "optim": {"b2": 0.99}})
    assert (cfg.steps, cfg.optim.lr, cfg.optim.b2, cfg.data.seq_len) == (9, 1e-3, 0.99, 32)
    assert cfg.data.paths == ("a.txt",)
    path.write_text("optim: {learning_rate: 1e-3}\n")
    with pytest.raises(TrainConfigError, match=r"c.yaml: unknown key 'optim.learning_rate'"):
        load_config(str(path))
    with pytest.raises(TrainConfigError, match="steps expects int"):
        load_config(None, {"steps": "many"})
    with pytest.raises(TrainConfigError, match="no such file or named config"):
        load_config("no-such-config")
    for name in (p.stem for p in (ROOT / "configs").glob("*.yaml")):
        load_config(name)


def test_cli_flags_map_onto_the_config():
    name, overrides = parse_args(
        [
            "--config", "tiny-arithmetic", "--preset", "tiny", "--data", "a.jsonl", "b.txt",
            "--steps", "5", "--batch", "4", "--seq-len", "128", "--mesh", "data=2,fsdp=4",
            "--seed", "3", "--checkpoint-dir", "runs/x", "--save-every", "2",
            "--init-from", "ckpt", "--sft", "--set", "optim.lr=1e-4",
        ]
    )  # fmt: skip
    cfg = load_config(name, overrides)
    assert (cfg.model, cfg.steps, cfg.data.batch, cfg.data.seq_len, cfg.mesh) == (
        "tiny", 5, 4, 128, "data=2,fsdp=4",
    )  # fmt: skip
    assert (cfg.seed, cfg.checkpoint_dir, cfg.save_every, cfg.init_from) == (3, "runs/x", 2, "ckpt")
    assert cfg.data.paths == ("a.jsonl", "b.txt") and cfg.data.sft and cfg.optim.lr == 1e-4


def test_help_explains_every_flag_with_its_default_and_shows_examples():
    p = parser()
    for action in p._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 20, f"{action.option_strings}: no help"
    for flag, (key, *_) in FLAGS.items():
        action = next(a for a in p._actions if flag in a.option_strings)
        assert f"config key {key}; default " in action.help, flag
    text = p.format_help()
    assert "see train/loop.py" not in text
    assert text.count("python -m llama_jax.train --") >= 2 and "examples:" in text
    helps = {a.option_strings[0]: a.help for a in p._actions}
    assert helps["--steps"].endswith("default 1000)") and "default 'fsdp=-1'" in helps["--mesh"]


def test_cpu_train_step_compiles_without_ynnpack_fusions():
    """The CPU option reaches the compiler (no YNNPACK fusion in the step's HLO, while a plain
    jit of the same product has one) and is left off every other backend."""
    a = jnp.ones((256, 512), jnp.float32)
    product = jax.jit(lambda x: x @ x.T)
    assert "__ynn_fusion" in product.lower(a).compile().as_text()
    tuned = jax.jit(lambda x: x @ x.T, compiler_options=train_step_options("cpu"))
    assert "__ynn_fusion" not in tuned.lower(a).compile().as_text()
    assert train_step_options("tpu") is None and train_step_options("gpu") is None
