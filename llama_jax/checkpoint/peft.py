"""Hugging Face PEFT LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

`save_peft` writes our adapter tree so that `peft.PeftModel.from_pretrained` puts it on
transformers' `LlamaForCausalLM`; `load_peft` reads such a directory (ours or one PEFT saved);
`merge_into` folds one into a loaded `Model` (what `convert --merge-lora` and `infer --lora` do).

PEFT stores, per adapted module and layer, `lora_A.weight [r, in]` and `lora_B.weight [out, r]`
in torch's layout, the module's input and output features flattened. Ours keep the weight's own
axes (`a [L, *in, r]`, `b [L, r, *out]`), flattened in the same (heads, head_dim) order, and our
q/k features are in HF's rotate-half order, so each tensor is a transpose and a reshape away.
Module names come from `layout.SPECS`, the one table of HF names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from llama_jax.api import Model
from llama_jax.checkpoint import layout
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.safetensors_io import (
    SINGLE_FILE,
    PlannedTensor,
    SafetensorsFile,
    write_sharded,
)
from llama_jax.config import LlamaConfig
from llama_jax.lora import TARGETS, LoraConfig, LoraError, adapter_shapes, check_adapters, merge
from llama_jax.model import Params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
Part = Literal["A", "B"]

# adapter_config.json fields whose set (truthy) values change what the adapter computes in ways
# a plain `W + scale * B @ A` per projection cannot express. (`fan_in_fan_out` is not one: PEFT
# turns it off for `nn.Linear`, so a Llama adapter's tensors are [r, in] and [out, r] anyway.)
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "fully trained modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "replicated layers",
    "target_parameters": "adapters on parameters",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
}
# Modules of LlamaForCausalLM that PEFT can adapt and we cannot.
OTHER_MODULES = ("lm_head", "model.embed_tokens")


def _spec(target: str) -> layout.TensorSpec:
    module, name, _ = TARGETS[target]
    return next(s for s in layout.SPECS if s.path == ("layers", module, name))


def hf_module(target: str, layer: int) -> str:
    """The module's name in `LlamaForCausalLM`, e.g. `model.layers.0.self_attn.q_proj`."""
    return _spec(target).name("hf", layer).removesuffix(".weight")


def hf_short_name(target: str) -> str:
    """The name PEFT's `target_modules` lists, e.g. `q_proj`."""
    return hf_module(target, 0).rsplit(".", 1)[-1]


def tensor_name(target: str, layer: int, part: Part) -> str:
    return f"{PREFIX}{hf_module(target, layer)}.lora_{part}.weight"


def torch_shapes(config: LlamaConfig, lora: LoraConfig, target: str) -> dict[Part, tuple]:
    """One layer's `lora_A` [r, in] and `lora_B` [out, r] shapes for `target`."""
    module, name, _ = TARGETS[target]
    shapes = adapter_shapes(config, lora)[module][name]
    r = lora.rank
    return {
        "A": (r, int(np.prod(shapes["a"].shape[1:-1]))),
        "B": (int(np.prod(shapes["b"].shape[2:])), r),
    }


# --- saving ------------------------------------------------------------------------------------


def peft_config(lora: LoraConfig, base_model: str | None) -> dict[str, Any]:
    """The `adapter_config.json` PEFT reads back into an equivalent `peft.LoraConfig`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [hf_short_name(t) for t in TARGETS if t in lora.targets],
        "bias": "none",
        "use_rslora": lora.rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _torch_layer(adapters: Params, target: str, layer: int, part: Part) -> np.ndarray:
    """One layer of one adapter on the host, in PEFT's layout."""
    module, name, _ = TARGETS[target]
    x = np.asarray(adapters[module][name]["a" if part == "A" else "b"][layer])
    if part == "A":
        return x.reshape(-1, x.shape[-1]).T
    return x.reshape(x.shape[0], -1).T


def _planned(adapters: Params, config: LlamaConfig, lora: LoraConfig) -> list[PlannedTensor]:
    out = []
    for target in lora.targets:
        module, name, _ = TARGETS[target]
        shapes = torch_shapes(config, lora, target)
        for layer in range(config.n_layers):
            for part in ("A", "B"):
                dtype = np.dtype(adapters[module][name]["a" if part == "A" else "b"].dtype)
                produce = partial(_torch_layer, adapters, target, layer, part)
                out.append(
                    PlannedTensor(tensor_name(target, layer, part), shapes[part], dtype, produce)
                )
    return out


def save_peft(
    adapters: Params,
    lora: LoraConfig,
    config: LlamaConfig,
    out_dir: str | Path,
    base_model: str | None = None,
) -> Path:
    """Write `adapters` as a PEFT adapter directory, in the adapters' dtype. The directory is
    built beside `out_dir` and renamed into place, so a reader never sees half an adapter; an
    existing adapter directory there is replaced. Returns `out_dir`."""
    out = Path(out_dir)
    check_adapters(adapters, config, lora, str(out))
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise CheckpointError(f"{out}: exists and is neither empty nor a PEFT adapter directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config_text = json.dumps(peft_config(lora, base_model), indent=2)
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        # One file however large (adapters are small); PEFT names it adapter_model.safetensors.
        write_sharded(tmp, _planned(adapters, config, lora), max_shard_bytes=sys.maxsize)
        (tmp / SINGLE_FILE).rename(tmp / WEIGHTS_FILE)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an `out` already there is renamed aside first, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


# --- loading -----------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked to describe a plain LoRA adapter."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {path.parent} a PEFT adapter directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg})") from None
    if cfg.get("peft_type") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r}: only LORA is supported")
    for field, what in UNSUPPORTED.items():
        if cfg.get(field):
            raise LoraError(f"{path}: {field}={cfg[field]!r} ({what}) is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    return cfg


def _matches(pattern: str | list[str] | None, key: str) -> bool:
    """PEFT's module matching: a string is a regex the whole name must match; a list names
    modules exactly or by a dotted suffix (`q_proj`, `self_attn.q_proj`)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return key in pattern or any(key.endswith(f".{p}") for p in pattern)


def _layers(cfg: dict[str, Any], config: LlamaConfig, where: Path) -> range | list[int]:
    """The layers `layers_to_transform` names (all of them when unset)."""
    chosen = cfg.get("layers_to_transform")
    if chosen is None:
        return range(config.n_layers)
    chosen = [chosen] if isinstance(chosen, int) else list(chosen)
    beyond = [i for i in chosen if not 0 <= i < config.n_layers]
    if beyond:
        raise LoraError(
            f"{where}: layers_to_transform names layer {beyond[0]}, but the base model has "
            f"{config.n_layers} layers (another base model?)"
        )
    return chosen


def _adapted(cfg: dict[str, Any], config: LlamaConfig, where: Path) -> dict[str, list[int]]:
    """Short target name -> the layers its adapter sits on, from target_modules,
    exclude_modules and layers_to_transform, matched the way PEFT matches module names."""
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        targets = [hf_short_name(t) for t in TARGETS]
    keys = {(t, i): hf_module(t, i) for t in TARGETS for i in range(config.n_layers)}
    _check_targets(targets, list(keys.values()), where)
    layers = set(_layers(cfg, config, where)) if isinstance(targets, list) else None
    exclude = cfg.get("exclude_modules")
    out: dict[str, list[int]] = {}
    for (target, i), key in keys.items():
        exact = isinstance(targets, list) and key in targets
        chosen = exact or (_matches(targets, key) and (layers is None or i in layers))
        if chosen and not _matches(exclude, key):
            out.setdefault(target, []).append(i)
    if not out:
        raise LoraError(f"{where}: target_modules {targets!r} matches no projection of the model")
    return out


def _check_targets(targets: str | list[str] | None, keys: list[str], where: Path) -> None:
    """Refuse target_modules naming modules other than the seven projections: the head and
    embeddings, or (list entries) names the model does not have."""
    known = ",".join(hf_short_name(t) for t in TARGETS)
    if not targets:
        raise LoraError(f"{where}: target_modules is empty")
    for other in OTHER_MODULES:
        if _matches(targets, other):
            raise LoraError(f"{where}: target_modules adapts {other}; only {known} are supported")
    for entry in targets if isinstance(targets, list) else []:
        if not any(_matches([entry], key) for key in keys):
            raise LoraError(f"{where}: target module {entry!r} is not one of {known}")


def _lora_config(cfg: dict[str, Any], targets: tuple[str, ...], where: Path) -> LoraConfig:
    try:
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
        dropout = float(cfg.get("lora_dropout", 0.0))
    except (KeyError, TypeError, ValueError):
        raise LoraError(f"{where}: r, lora_alpha or lora_dropout missing or not a number") from None
    try:
        return LoraConfig(rank, alpha, targets, dropout, bool(cfg.get("use_rslora", False)))
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from None


def _unexpected(name: str, config: LlamaConfig, where: Path) -> LoraError:
    """Why tensor `name` of the file is not one the adapter config leads us to expect."""
    lora_weight = re.fullmatch(r"(.+)\.lora_[AB]\.weight", name.removeprefix(PREFIX))
    parsed = layout.parse_name(f"{lora_weight.group(1)}.weight", "hf") if lora_weight else None
    if parsed is not None and parsed[1] is not None and parsed[1] >= config.n_layers:
        return LoraError(
            f"{where}: tensor {name}: layer {parsed[1]}, but the base model has "
            f"{config.n_layers} layers (another base model?)"
        )
    if parsed is not None and parsed[0].path[1:] in [(m, n) for m, n, _ in TARGETS.values()]:
        return LoraError(f"{where}: tensor {name}: its module is not in target_modules")
    return LoraError(
        f"{where}: tensor {name}: not a LoRA weight of "
        f"{','.join(hf_short_name(t) for t in TARGETS)} (other modules are not supported)"
    )


def _read_weights(
    path: Path, config: LlamaConfig, lora: LoraConfig, adapted: dict[str, list[int]]
) -> Params:
    """The adapter tree (float32 numpy), zero on layers the adapter leaves alone."""
    if not path.is_file() and (path.parent / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{path.parent / 'adapter_model.bin'}: pickled adapters are not read; "
            "save with safe_serialization=True (adapter_model.safetensors)"
        )
    file = SafetensorsFile(path)
    wanted = {
        tensor_name(t, i, part): (t, i, part) for t, ls in adapted.items() for i in ls
        for part in ("A", "B")
    }  # fmt: skip
    for name in file.names():
        if name not in wanted:
            raise _unexpected(name, config, path)
    shapes = adapter_shapes(config, lora)
    out: Params = {}
    for target in lora.targets:
        module, name, _ = TARGETS[target]
        out.setdefault(module, {})[name] = {
            k: np.zeros(s.shape, np.float32) for k, s in shapes[module][name].items()
        }
    needs = {target: torch_shapes(config, lora, target) for target in lora.targets}
    for tensor, (target, layer, part) in wanted.items():
        _fill(out, file, tensor, needs[target][part], target, layer, part)
    return out


def _fill(
    out: Params,
    file: SafetensorsFile,
    tensor: str,
    want: tuple[int, ...],
    target: str,
    layer: int,
    part: Part,
) -> None:
    """Copy one PEFT tensor, shape-checked, into its layer of our tree."""
    if tensor not in file.entries:
        raise LoraError(f"{file.path}: tensor {tensor}: missing")
    got = file.entries[tensor].shape
    if got != want:
        raise LoraError(
            f"{file.path}: {hf_module(target, layer)} lora_{part} has shape {got}, the base "
            f"model needs {want} (another base model?)"
        )
    module, name, _ = TARGETS[target]
    x = np.asarray(file.array(tensor), np.float32).T  # [in, r] or [r, out]
    dest = out[module][name]["a" if part == "A" else "b"]
    dest[layer] = x.reshape(dest.shape[1:])


def load_peft(adapter_dir: str | Path, config: LlamaConfig) -> tuple[Params, LoraConfig]:
    """(adapter tree as float32 numpy, its `LoraConfig`) of the PEFT adapter directory
    `adapter_dir`, checked against the base model `config`. A layer the adapter does not
    cover (`layers_to_transform`, a regex) gets zero adapters, which change nothing."""
    root = Path(adapter_dir)
    where = root / CONFIG_FILE
    cfg = _read_config(where)
    adapted = _adapted(cfg, config, where)
    lora = _lora_config(cfg, tuple(t for t in TARGETS if t in adapted), where)
    return _read_weights(root / WEIGHTS_FILE, config, lora, adapted), lora


# --- merging -----------------------------------------------------------------------------------


def merge_into(model: Model, adapter_dir: str | Path) -> Model:
    """`model` with the PEFT adapter at `adapter_dir` merged into its weights, which keep their
    dtype and sharding. The merge runs on the devices holding the weights, and the base params
    are donated to it (the merged model reuses their memory), so `model` is spent."""
    adapters, lora = load_peft(adapter_dir, model.config)
    shardings = jax.tree.map(lambda x: x.sharding, model.params)
    fn = jax.jit(partial(merge, lora=lora), out_shardings=shardings, donate_argnums=0)
    params = fn(model.params, adapters)
    return Model(model.config, params, tokenizer=model.tokenizer, mesh=model.mesh)
