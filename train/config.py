"""One training config: a YAML file (or a named one from `configs/`) plus command-line overrides.

The file mirrors `TrainConfig`: top-level run settings, and `data:` / `optim:` sections. Any
field can be overridden with `--set section.field=value` (value parsed as YAML); the common ones
have their own flags in `llama_jax.train`. Unknown keys are errors naming the file and key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama_jax.lora import LoraConfig, parse_targets
from train.data import DataConfig
from train.distill import DistillConfig
from train.dpo import DPOConfig
from train.grpo import GRPOConfig
from train.optim import OptimConfig
from train.reward_model import RewardModelConfig


def _config_dir() -> Path:
    """The named configs: `configs/` beside the packages in a checkout, `train/configs/` in an
    installed wheel (pyproject.toml ships them there)."""
    checkout = Path(__file__).resolve().parents[1] / "configs"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "configs"


CONFIG_DIR = _config_dir()


class TrainConfigError(ValueError):
    """A config file, key or value that a training run cannot use."""


@dataclass(frozen=True)
class LoraSettings:
    """The `lora:` section: `rank` 0 trains every weight; > 0 trains low-rank adapters on
    `targets` (comma-separated: q, k, v, o, gate, up, down, or all) over frozen base weights
    held in the compute dtype. The update is scaled by alpha / rank (alpha / sqrt(rank) with
    `rslora`); `dropout` applies to each adapter's input."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = "q,k,v,o,gate,up,down"
    dropout: float = 0.0
    rslora: bool = False

    def config(self) -> LoraConfig | None:
        if self.rank == 0:
            return None
        return LoraConfig(
            self.rank, self.alpha, parse_targets(self.targets), self.dropout, self.rslora
        )


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    `model` is a preset name; `init_from` (any layout `llama_jax.load` reads) replaces it with
    that checkpoint's config and weights. `model_overrides` changes LlamaConfig fields. How the
    model runs is the run's choice, not the model's: `compute_dtype` (matmuls, default bf16) and
    `remat` (activation checkpointing of each layer, default full). Trained parameters and
    optimizer moments are always float32; with `lora` only the adapters are trained, and the
    base (frozen, in the compute dtype) is read again from `init_from` (or made again from
    `seed`) on resume. `loss_chunks` > 1 computes the output head and loss over that many
    slices of the sequence, for less memory (see `train.step.chunked_sum`). `objective` is what
    the run minimises: "lm" (next-token cross-entropy; SFT with `data.sft`), "dpo" (preference
    pairs, the `dpo:` section), "distill" (a teacher's distributions, the `distill:` section:
    an online `teacher` or an offline `topk_dir`) or "grpo" (online reinforcement learning
    from sampled groups, the `grpo:` section; run by `python -m llama_jax.post grpo`); "reward"
    trains a reward model (Bradley-Terry on preference pairs, the `reward_model:` section; the
    model gets `num_labels: 1`, its score head). `dump_teacher_topk` K > 0 makes the run
    write the teacher's top-K log-probs of every batch into `distill.topk_dir` instead of
    training. `checkpoint_dir` is the run directory; it resumes when it holds a checkpoint. `export_dir` receives the final
    weights as `export_format`: "hf", "meta" or "orbax", or with LoRA "peft" (the adapter
    alone); "auto" is "peft" with LoRA, else "hf". `peak_tflops` is
    one device's peak for MFU (0: look it up or measure it). `sdc_check_every` N > 0 runs every
    Nth step a second time on other devices and compares replicas (`train.sdc`; 0: off).
    `watchdog_multiple` M > 0 ends a run whose step takes M times the median step time
    (`train.watchdog`; 0: off).
    """

    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    objective: str = "lm"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    dump_teacher_topk: int = 0
    steps: int = 1000
    grad_accum: int = 1
    loss_chunks: int = 1
    mesh: str = "fsdp=-1"
    rules: str = "fsdp"
    seed: int = 0
    checkpoint_dir: str | None = None
    save_every: int = 1000
    keep: int = 3
    export_dir: str | None = None
    export_format: str = "auto"
    log_every: int = 10
    peak_tflops: float = 0.0
    sdc_check_every: int = 0
    watchdog_multiple: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def updates(self) -> int:
        """Optimizer updates of the whole run (the learning-rate schedule's length): `steps`,
        or for GRPO `num_iterations` per round."""
        return self.steps * (self.grpo.num_iterations if self.objective == "grpo" else 1)


_SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "lora": LoraSettings,
    "dpo": DPOConfig,
    "distill": DistillConfig,
    "grpo": GRPOConfig,
    "reward_model": RewardModelConfig,
}
OBJECTIVES = ("lm", "dpo", "distill", "grpo", "reward")


def _coerce(value: Any, current: Any, key: str, source: str) -> Any:
    """Check a value against the type of the field's current value; ints and `1e-3`-style
    strings are accepted for floats, mappings are merged."""
    if key == "data.paths":
        return tuple(value) if isinstance(value, list | tuple) else (value,)
    if key == "lora.targets" and isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise TrainConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {**current, **value}
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(current, bool) != isinstance(value, bool):
        raise TrainConfigError(f"{source}: {key} expects {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(current)) and value is not None:
        raise TrainConfigError(f"{source}: {key} expects {type(current).__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], base: Any, prefix: str, source: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise TrainConfigError(
                f"{source}: unknown key {name!r}; known: {', '.join(sorted(known))}"
            )
        current = getattr(base, key)
        if key in _SECTIONS and cls is TrainConfig:
            if not isinstance(value, dict):
                raise TrainConfigError(f"{source}: {name} must be a mapping")
            changes[key] = _build(_SECTIONS[key], value, current, f"{name}.", source)
        else:
            changes[key] = _coerce(value, current, name, source)
    return dataclasses.replace(base, **changes)


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a file in `configs/` (`tiny-arithmetic` -> its .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{name}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise TrainConfigError(f"--config {name}: no such file or named config (known: {known})")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML file `path` <- `overrides` (nested dicts, as the file would hold them)."""
    config = TrainConfig()
    if path is not None:
        file = resolve_config_path(path)
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{file}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"{file}: expected a mapping at the top level")
        config = _build(TrainConfig, values, config, "", str(file))
    if overrides:
        config = _build(TrainConfig, overrides, config, "", "command line")
    if config.objective not in OBJECTIVES:
        raise TrainConfigError(
            f"objective {config.objective!r}: expected one of {', '.join(OBJECTIVES)}"
        )
    if config.objective == "reward":
        config = _reward_model_run(config)
    for key in ("sdc_check_every", "watchdog_multiple"):
        if getattr(config, key) < 0:
            raise TrainConfigError(f"{key} {getattr(config, key)}: must be >= 0 (0: off)")
    return config


def _reward_model_run(config: TrainConfig) -> TrainConfig:
    """A reward-model run's model is a one-label classifier (`LlamaConfig.num_labels`), every
    weight trained: the model config the run builds gets `num_labels: 1`."""
    if config.lora.rank:
        raise TrainConfigError("objective reward trains every weight and the head: set lora.rank 0")
    labels = config.model_overrides.get("num_labels", 1)
    if labels != 1:
        raise TrainConfigError(f"objective reward: model_overrides.num_labels {labels}, not 1")
    return dataclasses.replace(config, model_overrides={**config.model_overrides, "num_labels": 1})


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "data.sft=true"]` -> `{"optim": {"lr": 0.001}, "data": {"sft": True}}`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out
