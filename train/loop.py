"""The training run: mesh, model, data, resume, the jitted step, checkpoints and metrics.

The same code runs on one CPU, an emulated CPU mesh and a TPU pod: only `TrainConfig.mesh`
changes. A run directory that holds a checkpoint is resumed (parameters, optimizer, step, RNG
and data position), onto whatever mesh this run uses.

Step metrics stay on device and are fetched every `log_every` steps and before every save, so the
host never waits on the device in between; a non-finite loss or gradient found there stops the
run before any checkpoint of it is written, leaving the last good one. Optional checks stop a
run that a faulty or hung device would corrupt or stall: `train.sdc` (exit 75) and
`train.watchdog` (exit 76).
"""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.api import Model
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.load import load
from llama_jax.checkpoint.peft import save_peft
from llama_jax.checkpoint.run_dir import LORA_INFO, read_model_config
from llama_jax.config import ConfigError, LlamaConfig, preset
from llama_jax.lora import merge
from llama_jax.model import Params
from llama_jax.partitioning import placed_shapes
from llama_jax.xla_cpu import train_step_options
from sharding.distributed import global_batch, process_rows
from sharding.mesh import ShardingError, make_mesh
from sharding.place import batch_shardings, tree_shardings
from sharding.rules import resolver, with_rules
from train.checkpoint import RunCheckpointer, StopWatch
from train.config import TrainConfig, TrainConfigError
from train.data import SKIPPED, DataError
from train.distill import DistillError, TopKDump, dump_teacher_topk, topk_manifest
from train.metrics import MetricsLogger, flops_per_token, peak_flops_per_device
from train.objectives import (
    frozen_forwards,
    frozen_trees,
    keeps_start,
    needs_reference_pass,
    objective_for,
    reference_pass,
    training_batches,
)
from train.optim import make_optimizer
from train.reward_model import reward_start
from train.sdc import SdcCheck, SilentDataCorruption, on_mesh
from train.step import (
    BASE,
    Frozen,
    Policy,
    TrainState,
    abstract_train_state,
    build_step,
    init_train_state,
)
from train.tokenizers import BYTES, load_tokenizer
from train.watchdog import Watchdog


class NonFiniteLoss(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step and the checkpoint kept."""


# Errors reported as one line by the CLI: "fix the command or the files" (exit 1), and silent
# data corruption (its own `exit_code`: resume on other devices).
USER_ERRORS = (
    TrainConfigError,
    DataError,
    ConfigError,
    ShardingError,
    CheckpointError,
    DistillError,
    NonFiniteLoss,
    FileNotFoundError,
    SilentDataCorruption,
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
    """`base` with the run's overrides and run policy; trained parameters are always float32
    master weights."""
    policy = {"param_dtype": "float32", "compute_dtype": cfg.compute_dtype, "remat": cfg.remat}
    return base.replace(**{**cfg.model_overrides, **policy})


def load_pretrained(
    path: str, mesh: jax.sharding.Mesh, rules: str, dtype: str = "float32"
) -> tuple[LlamaConfig, Params]:
    """Weights to start from (any layout `llama_jax.load` reads: Meta, HF, Orbax, a training
    run), loaded straight onto the mesh in `dtype`."""
    model = load(path, dtype=dtype, shardings=resolver(mesh, rules))
    return model.config, model.params


def _run_info(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """What `llama_jax.load`/inference need besides the weights: the tokenizer file used, and
    for a LoRA run the adapters' settings and where the base comes from."""
    path = getattr(tokenizer, "path", None)
    info = {"train_config": cfg.to_dict(), "tokenizer": str(path) if path else BYTES}
    lora = cfg.lora.config()
    if lora is not None:
        base = str(Path(cfg.init_from).resolve()) if cfg.init_from else None
        info[LORA_INFO] = {**lora.to_dict(), "base": base, "seed": cfg.seed}
    return info


@dataclass
class Trainer:
    """A run ready to step: its mesh, model, state (fresh, imported or resumed), the frozen
    trees the objective reads (a LoRA base, a DPO reference, a teacher), data iterator (and
    the teacher's top-K dump it is joined with, offline), compiled step and checkpointer, and
    the silent-data-corruption check (None: off)."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    model_config: LlamaConfig
    policy: Policy
    state: TrainState
    frozen: Frozen
    data_iter: Any
    topk: TopKDump | None
    step_fn: Any
    ckpt: RunCheckpointer | None
    tokenizer: Any
    resumed: bool
    flops_per_token: float
    sdc: SdcCheck | None = None

    @property
    def steps_done(self) -> int:
        """The loop's steps done so far: updates (a GRPO round of several updates is one step,
        `train.rollouts`)."""
        return int(self.state.step)

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global batch arrays sharded over the mesh."""
        return global_batch(local, self.cfg.data.batch, self.mesh, self.cfg.rules)

    def step(self, step: int) -> dict[str, Any]:
        """Update `step` (1-based) on this process's next rows; the metrics stay on device, but
        for `skipped_documents` (bad documents this process passed over reading the rows; with
        `read_threads` the documents read ahead in the background)."""
        skipped = SKIPPED.count
        local = next(self.data_iter)
        if self.topk is not None:
            local |= self.topk.read(step, jax.process_index())
        args = (self.state, self.place(local), self.frozen)
        if self.sdc is not None and self.sdc.due(step):
            self.state, metrics = self.sdc.run(step, self.step_fn, *args)
        else:
            self.state, metrics = self.step_fn(*args)
        return {**metrics, "skipped_documents": float(SKIPPED.count - skipped)}

    def final_params(self) -> Params:
        """The trained model's weights: the params, or the base with the adapters merged."""
        lora = self.policy.lora
        if lora is None:
            return self.state.params
        return jax.jit(partial(merge, lora=lora))(self.frozen[BASE], self.state.params)


def _starting_point(
    cfg: TrainConfig, resumed: int | None, ckpt: RunCheckpointer | None, mesh: Any, keep: bool
) -> tuple[LlamaConfig, Params | None]:
    """The model's config and its starting weights (None: fresh from the seed, or not needed
    when resuming). `keep`: the start stays on as a frozen tree (`objectives.keeps_start`), so
    a resumed run reads `init_from` again; a LoRA base is read in the compute dtype."""
    dtype = cfg.compute_dtype if cfg.lora.config() is not None else "float32"
    if resumed is not None:
        config = read_model_config(ckpt.directory)
        if keep and cfg.init_from:
            return config, load_pretrained(cfg.init_from, mesh, cfg.rules, dtype)[1]
        return config, None
    if cfg.init_from:
        return load_pretrained(cfg.init_from, mesh, cfg.rules, dtype)
    return preset(cfg.model), None


def _data_shard(cfg: TrainConfig, mesh: Any) -> tuple[int, int]:
    """(index, count) of this process's data shard: processes whose devices hold the same rows
    of the batch read the same shard."""
    rows = process_rows((cfg.data.batch, cfg.data.seq_len), mesh, cfg.rules)
    n_rows = rows.stop - rows.start
    return rows.start // n_rows, cfg.data.batch // n_rows


def _topk_dump(cfg: TrainConfig, model_config: LlamaConfig) -> TopKDump:
    """The offline teacher's dump, checked against this run's data, seed and vocabulary."""
    expected = topk_manifest(
        cfg.data, cfg.seed, jax.process_count(), cfg.distill.temperature, model_config.vocab_size
    )
    return TopKDump.open(cfg.distill.topk_dir, expected)


def setup(cfg: TrainConfig, devices: list[Any] | None = None) -> Trainer:
    """Build everything a run needs on `devices` (default: all), resuming when the run
    directory holds a checkpoint."""
    mesh = make_mesh(cfg.mesh, devices)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ckpt = None
    if cfg.checkpoint_dir:
        ckpt = RunCheckpointer(cfg.checkpoint_dir, keep=cfg.keep)
    resume_step = ckpt.resumable_step() if ckpt else None
    lora = cfg.lora.config()

    reference_pass_due = needs_reference_pass(cfg)
    keep = keeps_start(cfg, lora) or reference_pass_due
    base, start = _starting_point(cfg, resume_step, ckpt, mesh, keep)
    model_config = model_config_for(cfg, base)
    if tokenizer.n_words > model_config.vocab_size:
        raise TrainConfigError(
            f"--tokenizer {cfg.data.tokenizer}: {tokenizer.n_words} ids do not fit the model's "
            f"vocab_size {model_config.vocab_size}"
        )
    policy = Policy(model_config, lora)
    if cfg.objective == "reward" and start is not None:
        start = reward_start(start, model_config, cfg.seed)
    frozen, teacher = frozen_trees(cfg, policy, start, mesh)
    if reference_pass_due:
        reference_pass(cfg, model_config, start, tokenizer)
    if lora is not None or resume_step is not None:
        start = None  # the state holds adapters, or comes from the checkpoint

    optimizer = make_optimizer(cfg.optim, cfg.updates)
    abstract = abstract_train_state(model_config, optimizer, lora)
    shardings = tree_shardings(abstract, model_config, mesh, cfg.rules, lora)
    data_iter = iter(training_batches(cfg, tokenizer, *_data_shard(cfg, mesh)))
    topk = (
        _topk_dump(cfg, model_config)
        if cfg.objective == "distill" and cfg.distill.topk_dir
        else None
    )

    if resume_step is not None:
        state = ckpt.restore(resume_step, placed_shapes(abstract, shardings), data_iter)
    else:
        make_state = jax.jit(
            partial(init_train_state, model_config, optimizer, cfg.seed, lora=lora),
            out_shardings=shardings,
            donate_argnames="params",
        )
        if start is None:  # parameters (or adapters) are created already sharded
            state = make_state()
        else:
            state = make_state(params=jax.device_put(start, shardings.params))

    batch_shape = jax.ShapeDtypeStruct((cfg.data.batch, cfg.data.seq_len), np.int32)
    batch_sharding = batch_shardings({"tokens": batch_shape}, mesh, cfg.rules)["tokens"]
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    objective = objective_for(cfg, policy, teacher)
    step = build_step(objective, optimizer, grad_accum=cfg.grad_accum)
    compile_step = partial(
        _jit_step, step, rules=cfg.rules, shardings=(shardings, batch_sharding, frozen_shardings)
    )
    sdc = SdcCheck(cfg.sdc_check_every, mesh, compile_step) if cfg.sdc_check_every else None
    fpt = flops_per_token(
        model_config, cfg.data.seq_len, lora, frozen_forwards(cfg, policy, teacher)
    )
    return Trainer(
        cfg,
        mesh,
        model_config,
        policy,
        state,
        frozen,
        data_iter,
        topk,
        compile_step(mesh),
        ckpt,
        tokenizer,
        resume_step is not None,
        fpt,
        sdc,
    )


def _jit_step(step: Any, mesh: jax.sharding.Mesh, rules: str, shardings: tuple) -> Any:
    """`step` jitted on `mesh` with the (state, batch, frozen) shardings' specs, the state
    donated; a function of the mesh so the SDC check compiles it again on other devices."""
    return jax.jit(
        with_rules(step, mesh, rules),
        in_shardings=on_mesh(shardings, mesh),
        out_shardings=(on_mesh(shardings[0], mesh), NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
        compiler_options=train_step_options(mesh.devices.flat[0].platform),
    )


def dump_teacher(cfg: TrainConfig, devices: list[Any] | None = None) -> int:
    """`--dump-teacher-topk K`: the teacher's top-K log-probs of every batch this run's data
    gives (the batches a student run with the same data settings and seed trains on), written
    into `distill.topk_dir`; an interrupted dump resumes. Returns the steps written."""
    if not (cfg.distill.teacher and cfg.distill.topk_dir):
        raise TrainConfigError("--dump-teacher-topk needs --teacher and --teacher-topk DIR")
    mesh = make_mesh(cfg.mesh, devices)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    teacher = load(
        cfg.distill.teacher, dtype=cfg.compute_dtype, shardings=resolver(mesh, cfg.rules)
    )
    config = teacher.config.replace(compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    k, temperature = cfg.dump_teacher_topk, cfg.distill.temperature
    manifest = topk_manifest(
        cfg.data, cfg.seed, jax.process_count(), temperature, config.vocab_size
    )
    dump = TopKDump.create(
        cfg.distill.topk_dir, {**manifest, "k": k, "teacher": cfg.distill.teacher}
    )
    data = iter(training_batches(cfg, tokenizer, *_data_shard(cfg, mesh)))

    def batches() -> Any:
        for step in range(1, cfg.steps + 1):
            yield step, global_batch(next(data), cfg.data.batch, mesh, cfg.rules)

    return dump_teacher_topk(
        teacher.params,
        config,
        batches(),
        dump,
        k,
        temperature,
        jax.process_index(),
        chunks=cfg.loss_chunks,
        total=cfg.steps,
        mesh=mesh,
        rules=cfg.rules,
    )


def run(cfg: TrainConfig, devices: list[Any] | None = None) -> RunResult:
    """Train for `cfg.steps` updates in all (counting those done before a resume)."""
    return run_trainer(setup(cfg, devices))


def run_trainer(t: Trainer) -> RunResult:
    """The step loop of a set-up run to its end, then the checkpoints closed and the export
    written (unless a signal stopped the run)."""
    cfg = t.cfg
    try:
        result = train(t)
    finally:
        if t.ckpt is not None:
            t.ckpt.wait()
            t.ckpt.close()
    if cfg.export_dir and not result.preempted:
        export_run(t)
    return result


def export_run(t: Trainer) -> Path:
    """The final weights into `export_dir` as `export_format`: a PEFT adapter directory, or the
    whole model (LoRA merged into its base) as HF, Meta or Orbax."""
    cfg, lora = t.cfg, t.policy.lora
    fmt = cfg.export_format if cfg.export_format != "auto" else ("peft" if lora else "hf")
    if fmt == "peft":
        if lora is None:
            raise TrainConfigError("export_format peft: the run trains no LoRA adapters")
        base = str(Path(cfg.init_from).resolve()) if cfg.init_from else None
        params = jax.device_get(t.state.params)
        return save_peft(params, lora, t.model_config, cfg.export_dir, base_model=base)
    model = Model(t.model_config, t.final_params(), tokenizer=t.tokenizer)
    return export(model, cfg.export_dir, to=fmt)


def _logger(t: Trainer) -> MetricsLogger:
    cfg, config = t.cfg, t.model_config
    devices = t.mesh.devices.ravel().tolist()
    peak, source = peak_flops_per_device(devices, config.compute_dtype, cfg.peak_tflops)
    lora, fpt = t.policy.lora, t.flops_per_token
    start = t.steps_done
    logger = MetricsLogger(
        cfg.checkpoint_dir,
        total_steps=cfg.steps,
        start_step=start,
        flops_per_token=fpt,
        peak_flops=peak,
        n_devices=len(devices),
        enabled=jax.process_index() == 0,
    )
    trained = ""
    if lora is not None:
        n = sum(x.size for x in jax.tree.leaves(t.state.params))
        trained = f"LoRA r={lora.rank} on {','.join(lora.targets)}: {n / 1e6:.2f}M trained | "
    logger.message(
        f"model {config.param_count() / 1e6:.1f}M params | {trained}mesh {dict(t.mesh.shape)} | "
        f"{cfg.data.batch}x{cfg.data.seq_len} tokens/step | {fpt / 1e6:.1f} MFLOP/token | "
        f"peak {peak / 1e12:.3g} TFLOP/s/device ({source}) | "
        + (f"resumed at step {start}" if t.resumed else "fresh start")
    )
    return logger


def train(t: Trainer) -> RunResult:
    """The step loop: metrics fetched every `log_every` steps and before each save; saves every
    `save_every` steps, at the end and on SIGTERM or Ctrl-C (then stop). Throughput is wall time
    between fetches, so it includes input processing and the blocking part of checkpoint saves.
    A step far slower than usual ends the process (`train.watchdog`)."""
    cfg, ckpt = t.cfg, t.ckpt
    logger = _logger(t)
    watch = StopWatch()
    watchdog = Watchdog(cfg.watchdog_multiple) if cfg.watchdog_multiple > 0 else None
    pending: list[dict[str, jax.Array]] = []
    last: dict[str, float] = {}
    timer = time.perf_counter()
    compiled = stopping = False
    try:
        for done in range(t.steps_done + 1, cfg.steps + 1):
            with _paused(watchdog, t.sdc is not None and t.sdc.due(done)):
                pending.append(t.step(done))
            stopping = watch.reached(done, ckpt.manager if ckpt else None)
            save = ckpt is not None and (done % cfg.save_every == 0 or done == cfg.steps)
            if not compiled or save or stopping or done % cfg.log_every == 0 or done == cfg.steps:
                records = _check_finite(jax.device_get(pending), done - len(pending) + 1, ckpt)
                if watchdog is not None:
                    watchdog.progress(len(records))
                now = time.perf_counter()
                seconds = now - timer if compiled else None
                last = logger.log(done - len(records) + 1, records, seconds)
                if not compiled:
                    logger.message(f"first step (with compilation) took {now - timer:.1f}s")
                compiled, pending = True, []
                timer = now
            if ckpt is not None and (save or stopping):
                with _paused(watchdog):
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
        if watchdog is not None:
            watchdog.close()
    return RunResult(t.state, t.model_config, last, watch.signal if stopping else None)


def _paused(watchdog: Watchdog | None, pause: bool = True) -> Any:
    """`watchdog.paused()` around work that is not an ordinary step, else nothing."""
    return watchdog.paused() if watchdog is not None and pause else nullcontext()


def _summary(t: Trainer, last: dict[str, float], tps: float | None) -> str:
    """The run's last line: where it ended, how fast it went and where its checkpoints are."""
    parts = [f"done: step {t.steps_done}"]
    if last:
        parts.append(f"loss {last['loss']:.4f}")
    if tps is not None:
        parts.append(f"{tps:,.0f} tokens/s (mean after compilation)")
    parts.append(f"checkpoints in {t.ckpt.directory}" if t.ckpt else "no checkpoint directory")
    if t.cfg.export_dir:
        parts.append(f"exporting to {t.cfg.export_dir}")
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
