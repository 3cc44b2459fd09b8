"""Our Orbax checkpoint format: `<dir>/llama_jax.json` (the config) + `<dir>/params` (Orbax).

Quantized params (`llama_jax.quantize`) are stored as they are, `quantization` in the JSON
naming the mode, so loading restores the same int8/fp8 values and scales without quantizing
again.

Orbax restores each array straight into its target sharding, each process reading only its own
shards, so this is the fast path for reloading models on a mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.model import Params, param_shapes
from llama_jax.partitioning import placed_shapes
from llama_jax.quantize import check_mode, quantization_of, quantized_shapes

CONFIG_FILE = "llama_jax.json"
PARAMS_DIR = "params"
FORMAT = "llama_jax.orbax.v1"


def is_orbax(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def read_config(path: Path) -> LlamaConfig:
    file = path / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{file}: format {data.get('format')!r} is not {FORMAT!r}")
        return LlamaConfig.from_dict(data["config"])
    except (json.JSONDecodeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from None


def read_quantization(path: Path) -> str | None:
    """The quantization mode the params at `path` are stored in; None for float params."""
    file = path / CONFIG_FILE
    mode = json.loads(file.read_text()).get("quantization")
    try:
        return None if mode is None else check_mode(mode)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _checkpointer():
    """Orbax's checkpointer, imported on first use: Orbax and TensorStore add tens of MB of
    resident memory and a noticeable start-up to every process that imports them, and loading
    Hugging Face or Meta checkpoints (what inference mostly does) never needs them."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_orbax(path: str | Path, config: LlamaConfig, params: Params) -> None:
    """Write `params` (sharded or not) and the config into directory `path`."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with _checkpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    payload = {"format": FORMAT, "config": config.to_dict()}
    if quantization_of(params) is not None:
        payload["quantization"] = quantization_of(params)
    (path / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def load_orbax(
    path: str | Path, config: LlamaConfig, shardings: Params, quantization: str | None = None
) -> Params:
    """Params restored straight into `shardings`, cast to `config.param_dtype` if the saved
    dtype differs (quantized values and scales are restored as stored)."""
    path = Path(path).absolute()
    shapes = param_shapes(config)
    if quantization is not None:
        shapes = quantized_shapes(shapes, config, quantization)
    target = placed_shapes(shapes, shardings)
    try:
        with _checkpointer() as ckptr:
            return ckptr.restore(path / PARAMS_DIR, target)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore ({e})") from e
