"""The training run: mesh, model, data, resume, the jitted step, checkpoints and metrics.

The same code runs on one CPU, an emulated CPU mesh and a TPU pod: only `TrainConfig.mesh`
changes. A run directory that holds a checkpoint is resumed (parameters, optimizer, step, RNG
and data position), onto whatever mesh this run uses.

Step metrics stay on device and are fetched every `log_every` steps and before every save, so the
host never waits on the device in between; a non-finite loss or gradient found there stops the
run before any checkpoint of it is written, leaving the last good one.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.api import Model
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.run_dir import read_model_config
from llama_jax.config import ConfigError, LlamaConfig, preset
from llama_jax.model import Params
from llama_jax.partitioning import placed_shapes
from llama_jax.xla_cpu import train_step_options
from sharding.distributed import global_batch, process_rows
from sharding.mesh import ShardingError, make_mesh
from sharding.place import batch_shardings, tree_shardings
from sharding.rules import resolver, with_rules
from train.checkpoint import RunCheckpointer, StopWatch
from train.config import TrainConfig, TrainConfigError
from train.data import DataError, make_dataset, open_documents
from train.metrics import MetricsLogger, flops_per_token, peak_flops_per_device
from train.optim import make_optimizer
from train.step import TrainState, abstract_train_state, build_train_step, init_train_state
from train.tokenizers import load_tokenizer


class NonFiniteLoss(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step and the checkpoint kept."""


# Errors that mean "fix the command or the files", reported as one line by the CLI.
USER_ERRORS = (
    TrainConfigError,
    DataError,
    ConfigError,
    ShardingError,
    CheckpointError,
    NonFiniteLoss,
    FileNotFoundError,
)


@dataclass
class RunResult:
    """The final state, and `stop_signal`: the signal (SIGTERM or SIGINT) that stopped the run
    early after saving, None when it ran to the end."""

    state: TrainState
    model_config: LlamaConfig
    last_metrics: dict[str, float]
    stop_signal: int | None

    @property
    def preempted(self) -> bool:
        return self.stop_signal is not None

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal, what schedulers and shells expect of a job a signal stopped."""
        return 0 if self.stop_signal is None else 128 + self.stop_signal


def model_config_for(cfg: TrainConfig, base: LlamaConfig) -> LlamaConfig:
    """`base` with the run's overrides and run policy; parameters are always float32 master
    weights."""
    policy = {"param_dtype": "float32", "compute_dtype": cfg.compute_dtype, "remat": cfg.remat}
    return base.replace(**{**cfg.model_overrides, **policy})


def load_pretrained(path: str, mesh: jax.sharding.Mesh, rules: str) -> tuple[LlamaConfig, Params]:
    """Weights to start from (any layout `llama_jax.load` reads: Meta, HF, Orbax, a training
    run), loaded straight onto the mesh in float32."""
    model = load(path, dtype="float32", shardings=resolver(mesh, rules))
    return model.config, model.params


def _run_info(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """What `llama_jax.load`/inference need besides the weights: the tokenizer file used."""
    path = getattr(tokenizer, "path", None)
    return {"train_config": cfg.to_dict(), "tokenizer": str(path) if path else "bytes"}


@dataclass
class Trainer:
    """A run ready to step: its mesh, model, state (fresh, imported or resumed), data iterator,
    compiled step and checkpointer."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    model_config: LlamaConfig
    state: TrainState
    data_iter: Any
    step_fn: Any
    ckpt: RunCheckpointer | None
    tokenizer: Any
    resumed: bool

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global batch arrays sharded over the mesh."""
        return global_batch(local, self.cfg.data.batch, self.mesh, self.cfg.rules)


def setup(cfg: TrainConfig, devices: list[Any] | None = None) -> Trainer:
    """Build everything a run needs on `devices` (default: all), resuming when the run
    directory holds a checkpoint."""
    mesh = make_mesh(cfg.mesh, devices)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ckpt = None
    if cfg.checkpoint_dir:
        ckpt = RunCheckpointer(cfg.checkpoint_dir, keep=cfg.keep)
    resume_step = ckpt.latest_step() if ckpt else None

    pretrained = None
    if resume_step is not None:
        base = read_model_config(ckpt.directory)
    elif cfg.init_from:
        base, pretrained = load_pretrained(cfg.init_from, mesh, cfg.rules)
    else:
        base = preset(cfg.model)
    model_config = model_config_for(cfg, base)
    if tokenizer.n_words > model_config.vocab_size:
        raise TrainConfigError(
            f"--tokenizer {cfg.data.tokenizer}: {tokenizer.n_words} ids do not fit the model's "
            f"vocab_size {model_config.vocab_size}"
        )

    optimizer = make_optimizer(cfg.optim, cfg.steps)
    abstract = abstract_train_state(model_config, optimizer)
    shardings = tree_shardings(abstract, model_config, mesh, cfg.rules)
    # Processes whose devices hold the same rows of the batch read the same data shard.
    rows = process_rows((cfg.data.batch, cfg.data.seq_len), mesh, cfg.rules)
    n_rows = rows.stop - rows.start
    data_iter = iter(
        make_dataset(
            open_documents(cfg.data.paths),
            tokenizer,
            cfg.data,
            seed=cfg.seed,
            shard_index=rows.start // n_rows,
            shard_count=cfg.data.batch // n_rows,
        )
    )

    if resume_step is not None:
        state = ckpt.restore(resume_step, placed_shapes(abstract, shardings), data_iter)
    else:
        make_state = jax.jit(
            partial(init_train_state, model_config, optimizer, cfg.seed),
            out_shardings=shardings,
            donate_argnames="params",
        )
        if pretrained is None:  # parameters are created already sharded
            state = make_state()
        else:
            state = make_state(params=jax.device_put(pretrained, shardings.params))

    batch_shape = jax.ShapeDtypeStruct((cfg.data.batch, cfg.data.seq_len), np.int32)
    batch_sharding = batch_shardings({"tokens": batch_shape}, mesh, cfg.rules)["tokens"]
    step = build_train_step(
        model_config, optimizer, grad_accum=cfg.grad_accum, loss_chunks=cfg.loss_chunks
    )
    step_fn = jax.jit(
        with_rules(step, mesh, cfg.rules),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
        compiler_options=train_step_options(mesh.devices.flat[0].platform),
    )
    return Trainer(
        cfg,
        mesh,
        model_config,
        state,
        data_iter,
        step_fn,
        ckpt,
        tokenizer,
        resume_step is not None,
    )


def run(cfg: TrainConfig, devices: list[Any] | None = None) -> RunResult:
    """Train for `cfg.steps` updates in all (counting those done before a resume)."""
    t = setup(cfg, devices)
    try:
        result = train(t)
    finally:
        if t.ckpt is not None:
            t.ckpt.wait()
            t.ckpt.close()
    if cfg.export_dir and not result.preempted:
        model = Model(t.model_config, result.state.params, tokenizer=t.tokenizer)
        export(model, cfg.export_dir, to=cfg.export_format)
    return result


def _logger(t: Trainer) -> MetricsLogger:
    cfg, config = t.cfg, t.model_config
    devices = t.mesh.devices.ravel().tolist()
    peak, source = peak_flops_per_device(devices, config.compute_dtype, cfg.peak_tflops)
    fpt = flops_per_token(config, cfg.data.seq_len)
    start = int(t.state.step)
    logger = MetricsLogger(
        cfg.checkpoint_dir,
        total_steps=cfg.steps,
        start_step=start,
        flops_per_token=fpt,
        peak_flops=peak,
        n_devices=len(devices),
        enabled=jax.process_index() == 0,
    )
    logger.message(
        f"model {config.param_count() / 1e6:.1f}M params | mesh {dict(t.mesh.shape)} | "
        f"{cfg.data.batch}x{cfg.data.seq_len} tokens/step | {fpt / 1e6:.1f} MFLOP/token | "
        f"peak {peak / 1e12:.3g} TFLOP/s/device ({source}) | "
        + (f"resumed at step {start}" if t.resumed else "fresh start")
    )
    return logger


def train(t: Trainer) -> RunResult:
    """The step loop: metrics fetched every `log_every` steps and before each save; saves every
    `save_every` steps, at the end and on SIGTERM or Ctrl-C (then stop). Throughput is wall time
    between fetches, so it includes input processing and the blocking part of checkpoint saves."""
    cfg, ckpt = t.cfg, t.ckpt
    logger = _logger(t)
    watch = StopWatch()
    pending: list[dict[str, jax.Array]] = []
    last: dict[str, float] = {}
    timer = time.perf_counter()
    compiled = stopping = False
    try:
        for done in range(int(t.state.step) + 1, cfg.steps + 1):
            t.state, metrics = t.step_fn(t.state, t.place(next(t.data_iter)))
            pending.append(metrics)
            stopping = watch.reached(done, ckpt.manager if ckpt else None)
            save = ckpt is not None and (done % cfg.save_every == 0 or done == cfg.steps)
            if not compiled or save or stopping or done % cfg.log_every == 0 or done == cfg.steps:
                records = _check_finite(jax.device_get(pending), done - len(pending) + 1, ckpt)
                now = time.perf_counter()
                seconds = now - timer if compiled else None
                last = logger.log(done - len(records) + 1, records, seconds)
                if not compiled:
                    logger.message(f"first step (with compilation) took {now - timer:.1f}s")
                compiled, pending = True, []
                timer = now
            if ckpt is not None and (save or stopping):
                ckpt.save(t.state, t.data_iter, t.model_config, _run_info(cfg, t.tokenizer))
            if stopping:
                saved = (
                    f"saved step {done}; rerun the same command to resume" if ckpt else "stopped"
                )
                logger.message(f"{signal.Signals(watch.signal).name} at step {done}: {saved}")
                break
        else:
            logger.message(_summary(t, last, logger.mean_tokens_per_sec()))
    finally:
        watch.close()
        logger.close()
    return RunResult(t.state, t.model_config, last, watch.signal if stopping else None)


def _summary(t: Trainer, last: dict[str, float], tps: float | None) -> str:
    """The run's last line: where it ended, how fast it went and where its checkpoints are."""
    parts = [f"done: step {int(t.state.step)}"]
    if last:
        parts.append(f"loss {last['loss']:.4f}")
    if tps is not None:
        parts.append(f"{tps:,.0f} tokens/s (mean after compilation)")
    parts.append(f"checkpoints in {t.ckpt.directory}" if t.ckpt else "no checkpoint directory")
    if t.cfg.export_dir:
        parts.append(f"exporting to {t.cfg.export_dir} ({t.cfg.export_format})")
    return " | ".join(parts)


def _check_finite(
    records: list[dict[str, Any]], first_step: int, ckpt: RunCheckpointer | None
) -> list[dict[str, float]]:
    out = [{k: float(v) for k, v in r.items()} for r in records]
    for i, r in enumerate(out):
        if not (np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])):
            kept = ckpt.latest_step() if ckpt else None
            where = (
                f"last good checkpoint: step {kept} in {ckpt.directory}"
                if kept is not None
                else "no checkpoint"
            )
            raise NonFiniteLoss(
                f"step {first_step + i}: loss {r['loss']}, grad norm {r['grad_norm']} is not finite; "
                f"stopping ({where}). Lower optim.lr or raise optim.warmup_steps."
            )
    return out
