"""Reading a training run's directory: the model config and parameters of one saved step.

A run directory holds `checkpoints/<step>/`, one Orbax item per entry of `ITEMS` (the training
package writes them: see `train.checkpoint`). Only `model_config`, `params` and `run` are read
here, so `llama_jax.load(run_dir)` needs nothing from the training package. A LoRA run's
`params` are its adapters; its `run` item says where the frozen base comes from (`LORA_INFO`),
and loading merges the adapters into that base.

The step read is the newest that matches its checksum manifest (`integrity`); each newer one is
reported in one line and skipped. A step directory given explicitly must match its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import lora
from llama_jax.checkpoint import integrity
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.placement import ShardingsLike, resolve_shardings
from llama_jax.config import LlamaConfig
from llama_jax.model import Params, init_params, param_shapes
from llama_jax.partitioning import placed_shapes

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "progress", "data", "model_config", "run")
# Key of the `run` item that marks a LoRA run: the adapters' `LoraConfig.to_dict()` plus
# `base` (the base checkpoint's path, None for fresh weights) and `seed` (those weights' seed).
LORA_INFO = "lora"


def checkpoint_root(path: Path) -> tuple[Path, int | None]:
    """(Orbax manager directory, step or None for the latest) for a run directory, its
    `checkpoints/` directory or one step directory."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if (path / "params").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    return path, None


def _good_step(root: Path, step: int | None) -> int | None:
    """`step` if it matches its manifest, or (None) the newest step that does."""
    if step is not None:
        integrity.check_step(root / str(step))
        return step
    good, damaged = integrity.newest_good_step(root)
    for _, line in damaged:
        integrity.report(f"{line}; reading step {good}")
    return good


def _open(path: str | Path) -> tuple[Any, int]:
    """A read-only Orbax manager on `path` and the step to read. Orbax is imported here, on
    first use, for the reason `orbax_io` gives."""
    import orbax.checkpoint as ocp

    root, step = checkpoint_root(Path(path).resolve())
    step = _good_step(root, step)
    if step is None:
        raise CheckpointError(
            f"{path}: no training checkpoint found (expected {CHECKPOINTS}/<step>/)"
        )
    # Options a read-only manager would otherwise "correct" with a warning each; and its
    # "Given directory is read only" warning, which is not true: only this reader is.
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with _absl_warning_dropped("Given directory is read only"):
        manager = ocp.CheckpointManager(root, options=options, item_names=ITEMS)
    return manager, step


@contextlib.contextmanager
def _absl_warning_dropped(prefix: str) -> Iterator[None]:
    """Drop absl log records that start with `prefix` while the block runs."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _read_config(manager: Any, step: int) -> LlamaConfig:
    import orbax.checkpoint as ocp

    meta = manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return LlamaConfig.from_dict(meta["model_config"])


def read_model_config(path: str | Path) -> LlamaConfig:
    """The model config saved with a run's latest checkpoint (or with the step dir given)."""
    manager, step = _open(path)
    with manager:
        return _read_config(manager, step)


def load_run_params(
    path: str | Path, shardings: ShardingsLike = None
) -> tuple[LlamaConfig, Params]:
    """(model config, float32 params) of a run's latest checkpoint (or of the step directory
    given), restored straight into `shardings` (as `llama_jax.load` takes them; default: the
    first device). A LoRA run gives its base with the adapters merged."""
    import orbax.checkpoint as ocp

    manager, step = _open(path)
    with manager:
        config = _read_config(manager, step)
        placed = resolve_shardings(config, shardings)
        info = _run_item(manager, step).get(LORA_INFO)
        if info is not None:
            return config, _merged_lora_run(manager, step, config, info, placed)
        target = placed_shapes(param_shapes(config), placed)
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )
    return config, restored["params"]


def run_tokenizer(path: str | Path) -> Any:
    """The tokenizer a run trained with, as its `run` item names it: the byte-level one, or
    the file it read (None when that file is gone or the run names none)."""
    from llama_jax.tokenizer import BYTE_TOKENIZER, ByteTokenizer, open_tokenizer

    manager, step = _open(path)
    with manager:
        name = _run_item(manager, step).get("tokenizer")
    if name == BYTE_TOKENIZER:
        return ByteTokenizer()
    if name and Path(name).is_file():
        return open_tokenizer(name)
    return None


def _run_item(manager: Any, step: int) -> dict[str, Any]:
    """The step's `run` item (a checkpoint written without one reads as empty)."""
    import orbax.checkpoint as ocp

    try:
        run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except KeyError:  # Orbax: the item is not in this checkpoint
        return {}
    return run or {}


def _merged_lora_run(
    manager: Any, step: int, config: LlamaConfig, info: dict[str, Any], placed: Any
) -> Params:
    """A LoRA run's adapters merged into its base (read from where the run read it, in float32,
    or made again from the run's seed)."""
    import orbax.checkpoint as ocp

    from llama_jax.checkpoint.load import load_params  # load reads run directories through here

    settings = lora.LoraConfig.from_dict(info)
    if info.get("base"):
        base = load_params(info["base"], "float32", placed)[1]
    else:
        base = jax.jit(lambda: init_params(config, int(info["seed"])), out_shardings=placed)()
    sharding = jax.tree.leaves(base)[0].sharding
    replicated = (
        NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, NamedSharding)
        else sharding
    )
    shapes = lora.adapter_shapes(config, settings)
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )
    adapters = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )["params"]
    return jax.jit(lambda b, a: lora.merge(b, a, settings))(base, adapters)
