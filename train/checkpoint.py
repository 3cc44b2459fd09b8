"""Run checkpoints with Orbax: asynchronous saves every N steps, on SIGTERM or Ctrl-C, keep the
last K.

A run directory holds `checkpoints/<step>/` with these items:
  params        float32 parameters (pure dict), sharded arrays
  opt_state     optimizer state (same tree as `optimizer.init`)
  progress      JSON: step and the raw RNG key
  data          the grain iterator position, one JSON file per host
  model_config  JSON: `LlamaConfig.to_dict()`, so the params load without any flag
  run           JSON: the resolved training config and the tokenizer used

Process 0 adds each step's checksum manifest (`llama_jax.checkpoint.integrity`): once every
item is written, before Orbax renames the step into place, and completed once the step is
committed. A resume takes the newest step that matches its manifest,
reports each newer one in one line and moves it aside to `<step>.damaged`, so the run saves
that step again. A save cut short at any point leaves no manifest, so it is never resumed.

Arrays are restored onto whatever shardings the caller asks for, so a checkpoint written on one
mesh resumes on another. Reading just the config and parameters of a step needs nothing from
here: `llama_jax.checkpoint.run_dir` does it, and `llama_jax.load(run_dir)` uses it.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.checkpoint import integrity
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.run_dir import CHECKPOINTS, ITEMS
from llama_jax.config import LlamaConfig
from train.step import TrainState


class RunCheckpointer:
    """The Orbax `CheckpointManager` of one run directory, and the manifests of its steps."""

    def __init__(self, run_dir: str | Path, *, keep: int):
        self.directory = Path(run_dir).resolve() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # a save cut short by kill -9 leaves a temporary dir
            async_options=ocp.AsyncOptions(post_finalization_callback=self._manifest_before_rename),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        if jax.process_index() == 0 and not integrity.saved_steps(self.directory):
            integrity.require_manifests(self.directory)
        # One thread seals steps in order: it waits for Orbax's save, then completes the manifest.
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-manifest")
        self._sealing: tuple[int, Future[None]] | None = None
        self._saving: int | None = None  # the step Orbax writes now (saves never overlap)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def resumable_step(self) -> int | None:
        """The newest step that matches its manifest (None: no step saved yet). Each newer step
        is reported in one line and moved aside, so this run saves that step again."""
        good, damaged = integrity.newest_good_step(self.directory)
        if damaged:
            _sync_processes("llama_jax: damaged steps checked")
            for step, line in damaged:
                aside = _moved_aside(self.directory / str(step))
                integrity.report(f"{line}; moved to {aside.name}, resuming from step {good}")
            _sync_processes("llama_jax: damaged steps moved aside")
            self.manager.reload()
        return good

    def save(
        self,
        state: TrainState,
        data_iter: Any,
        model_config: LlamaConfig,
        run_info: dict[str, Any],
    ) -> bool:
        """Start an asynchronous save of step `state.step` (the loop decides when).

        The device arrays are copied before this returns, so the state may be donated to the
        next step right away; the data position is read now, before the iterator moves on.
        The previous save and its manifest are waited for first (Orbax waits for that save
        anyway).
        """
        step = int(state.step)
        self.wait()
        self._saving = step
        saved = self.manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                progress=ocp.args.JsonSave({"step": step, "rng": np.asarray(state.rng).tolist()}),
                data=grain.checkpoint.CheckpointSave(data_iter),
                model_config=ocp.args.JsonSave(model_config.to_dict()),
                run=ocp.args.JsonSave(run_info),
            ),
        )
        if saved:
            self._sealing = (step, self._sealer.submit(self._seal, step))
        return saved

    def _manifest_before_rename(self) -> None:
        """Orbax's hook once every item of the step is final, before its commit record and
        rename: the manifest then appears with the step."""
        if jax.process_index() == 0:
            tmp = f"{self._saving}{ocp.path.atomicity.TMP_DIR_SUFFIX}"
            integrity.write_manifest(self.directory / tmp, integrity.COMMIT_RECORD)

    def _seal(self, step: int) -> None:
        """Once Orbax has committed `step`, add its commit record to the manifest (on process
        0, the one that renamed it). Saves never overlap a seal (`save` waits first), so `keep`
        cannot delete the step meanwhile."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            integrity.write_manifest(self.directory / str(step))

    def restore(self, step: int, target: TrainState, data_iter: Any) -> TrainState:
        """The train state of `step` onto `target`'s shardings (`ShapeDtypeStruct`s with
        shardings), and the data iterator moved to that step's position."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                opt_state=ocp.args.StandardRestore(target.opt_state),
                progress=ocp.args.JsonRestore(),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        progress = restored["progress"]
        rng = jax.device_put(np.asarray(progress["rng"], np.uint32), target.rng.sharding)
        step_array = jax.device_put(np.int32(progress["step"]), target.step.sharding)
        return TrainState(step_array, restored["params"], restored["opt_state"], rng)

    def wait(self) -> None:
        """Block until every started save is on disk with its manifest; a save that failed (a
        full disk, say) raises a one-line `CheckpointError` (a step cut short before its
        manifest was in place is never resumed)."""
        if self._sealing is not None:
            (step, sealing), self._sealing = self._sealing, None
            try:
                sealing.result()
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory}: saving failed "
                    f"({type(e).__name__}: {e})"
                ) from e
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._sealer.shutdown()
            self.manager.close()


def _sync_processes(name: str) -> None:
    """Every process waits here for the others (nothing to wait for on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _moved_aside(step_dir: Path) -> Path:
    """Rename a damaged step to the first free `<step>.damaged[.N]` (process 0; Orbax ignores
    names that are not numbers), kept for inspection rather than deleted."""
    aside = step_dir.with_name(f"{step_dir.name}.damaged")
    n = 1
    while aside.exists():
        aside, n = step_dir.with_name(f"{step_dir.name}.damaged.{n}"), n + 1
    if jax.process_index() == 0:
        step_dir.rename(aside)
    return aside


class StopWatch:
    """Turns SIGTERM (a preemption notice) and Ctrl-C (SIGINT) into a flag the training loop
    checks every step, so either saves the step it reached and stops cleanly.

    A second Ctrl-C means "now": it exits at once with 130, without saving (a save cut short
    leaves only an Orbax temporary directory, never a checkpoint). On multi-host jobs JAX's
    preemption sync point makes every host stop at the same step on SIGTERM; Ctrl-C there keeps
    Python's default, since one host stopping alone would leave the others waiting for it.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal)}
        if jax.process_count() == 1:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            sys.stderr.write("\nsecond Ctrl-C: stopped without saving\n")
            sys.stderr.flush()
            os._exit(128 + signal.SIGINT)
        self.signal = signum

    def reached(self, step: int, manager: ocp.CheckpointManager | None) -> bool:
        multi_host = manager is not None and jax.process_count() > 1
        if multi_host and manager.reached_preemption(step):
            self.signal = signal.SIGTERM
        return self.signal is not None

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
