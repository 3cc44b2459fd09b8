"""Run checkpoints with Orbax: asynchronous saves every N steps, on SIGTERM or Ctrl-C, keep the
last K.

A run directory holds `checkpoints/<step>/` with these items:
  params        float32 parameters (pure dict), sharded arrays
  opt_state     optimizer state (same tree as `optimizer.init`)
  progress      JSON: step and the raw RNG key
  data          the grain iterator position, one JSON file per host
  model_config  JSON: `LlamaConfig.to_dict()`, so the params load without any flag
  run           JSON: the resolved training config and the tokenizer used

Arrays are restored onto whatever shardings the caller asks for, so a checkpoint written on one
mesh resumes on another. Reading just the config and parameters of a step needs nothing from
here: `llama_jax.checkpoint.run_dir` does it, and `llama_jax.load(run_dir)` uses it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.checkpoint.run_dir import CHECKPOINTS, ITEMS
from llama_jax.config import LlamaConfig
from train.step import TrainState


class RunCheckpointer:
    """The Orbax `CheckpointManager` of one run directory."""

    def __init__(self, run_dir: str | Path, *, keep: int):
        self.directory = Path(run_dir).resolve() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # a save cut short by kill -9 leaves a temporary dir
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
        """
        step = int(state.step)
        return self.manager.save(
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
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
