"""What a run minimises, and what that needs besides the trained tree: the objective of
`TrainConfig.objective`, the frozen trees it reads, its data stream, and the forwards of frozen
models it adds to each step (for the FLOP count).

  lm       next-token cross-entropy (pretraining, SFT)         frozen: the LoRA base, if any
  dpo      preference pairs (`train.dpo`)                      frozen: the LoRA base, or a
                                                               reference copy of the start
  distill  a teacher's distributions (`train.distill`)         frozen: the teacher (online)
  grpo     sampled groups and their rewards (`train.grpo`)     frozen: the LoRA base, or a
                                                               reference copy (beta > 0)
  reward   a reward model on preference pairs (Bradley-Terry,  frozen: none
           `train.reward_model`)

Frozen trees are never checkpointed: they are read again from where the run read them
(`init_from`, the teacher's checkpoint) or made again from the seed, on every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp

from llama_jax.checkpoint.load import load
from llama_jax.config import LlamaConfig
from llama_jax.lora import LoraConfig
from llama_jax.model import Params, init_params, param_shapes
from sharding.place import tree_shardings
from sharding.rules import resolver
from train.config import TrainConfig, TrainConfigError
from train.data import make_dataset, open_documents
from train.distill import TEACHER, check_teacher, distill_objective
from train.dpo import REFERENCE, dpo_objective, reference_logps
from train.grpo import grpo_objective
from train.preference import REF_KEYS, PreferenceSource, make_preference_dataset
from train.prompts import prompt_batches, read_prompts
from train.reward_model import reward_objective
from train.step import BASE, Frozen, Objective, Policy, lm_objective

REFERENCE_FILE = "reference-logps.p{process}.jsonl"  # in the run directory


def keeps_start(cfg: TrainConfig, lora: LoraConfig | None) -> bool:
    """Whether the starting weights stay on as a frozen tree: a LoRA base or a DPO reference
    copy. Such runs read `init_from` again on resume."""
    return lora is not None or _reference_copy(cfg, lora)


def _reference_copy(cfg: TrainConfig, lora: LoraConfig | None) -> bool:
    """Whether the objective reads a frozen copy of the starting weights as its reference."""
    if cfg.objective == "dpo":
        return cfg.dpo.uses_frozen_copy(lora)
    return cfg.objective == "grpo" and cfg.grpo.uses_frozen_copy(lora)


def frozen_copy(config: LlamaConfig, start: Params | None, cfg: TrainConfig, mesh: Any) -> Params:
    """The starting weights as a frozen tree in the compute dtype: a copy of the loaded ones
    (never their buffers, which the train state's creation donates), or fresh float32 ones from
    the seed, cast (what `llama_jax.load` of a LoRA run makes again), created sharded."""
    if start is None:
        shardings = tree_shardings(param_shapes(config), config, mesh, cfg.rules)
        start = jax.jit(lambda: init_params(config, cfg.seed), out_shardings=shardings)()
    return jax.tree.map(lambda w: jnp.array(w, dtype=cfg.compute_dtype, copy=True), start)


def load_teacher(cfg: TrainConfig, student: LlamaConfig, mesh: Any) -> tuple[LlamaConfig, Params]:
    """The online teacher (`distill.teacher`) on the student's mesh, in the compute dtype, run
    as the student is (compute dtype, remat); its vocabulary must be the student's."""
    model = load(cfg.distill.teacher, dtype=cfg.compute_dtype, shardings=resolver(mesh, cfg.rules))
    config = model.config.replace(compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    check_teacher(student, config, cfg.distill.teacher)
    return config, model.params


def frozen_trees(
    cfg: TrainConfig, policy: Policy, start: Params | None, mesh: Any
) -> tuple[Frozen, LlamaConfig | None]:
    """The frozen trees of the run's objective, and the online teacher's config (if any)."""
    frozen: Frozen = {}
    if policy.lora is not None:
        frozen[BASE] = frozen_copy(policy.config, start, cfg, mesh)
    if _reference_copy(cfg, policy.lora):
        frozen[REFERENCE] = frozen.get(BASE) or frozen_copy(policy.config, start, cfg, mesh)
    teacher = None
    if cfg.objective == "distill" and cfg.distill.topk_dir is None:
        if cfg.distill.teacher is None:
            raise TrainConfigError(
                "objective distill: name the teacher (--teacher CHECKPOINT) or its dump "
                "(--teacher-topk DIR)"
            )
        teacher, frozen[TEACHER] = load_teacher(cfg, policy.config, mesh)
    return frozen, teacher


def objective_for(cfg: TrainConfig, policy: Policy, teacher: LlamaConfig | None) -> Objective:
    if cfg.objective == "dpo":
        return dpo_objective(policy, cfg.dpo, cfg.loss_chunks)
    if cfg.objective == "distill":
        return distill_objective(policy, teacher, cfg.distill, cfg.loss_chunks)
    if cfg.objective == "grpo":
        return grpo_objective(policy, cfg.grpo, cfg.loss_chunks)
    if cfg.objective == "reward":
        return reward_objective(policy, cfg.reward_model)
    return lm_objective(policy, cfg.loss_chunks)


def frozen_forwards(cfg: TrainConfig, policy: Policy, teacher: LlamaConfig | None) -> list:
    """Configs of the frozen models each step runs forward: DPO's reference (unless its
    log-probs are precomputed), GRPO's (once per round of `num_iterations` updates, counted
    with each), the online teacher."""
    if cfg.objective == "dpo" and cfg.dpo.reference != "precomputed":
        return [policy.config]
    if cfg.objective == "grpo" and cfg.grpo.beta > 0:
        return [policy.config]
    return [teacher] if teacher is not None else []


def needs_reference_pass(cfg: TrainConfig) -> bool:
    """DPO with precomputed reference log-probs whose data does not carry them yet, and whose
    run directory holds no earlier pass."""
    if cfg.objective != "dpo" or cfg.dpo.reference != "precomputed":
        return False
    if REF_KEYS[0] in PreferenceSource(cfg.data.paths)[0]:
        return False
    return _reference_path(cfg) is None or not _reference_path(cfg).is_file()


def _reference_path(cfg: TrainConfig) -> Path | None:
    if cfg.checkpoint_dir is None:
        return None
    return Path(cfg.checkpoint_dir) / REFERENCE_FILE.format(process=jax.process_index())


def reference_pass(
    cfg: TrainConfig, config: LlamaConfig, start: Params | None, tokenizer: Any
) -> Path:
    """`--precompute-reference`: the starting model's log-probs of every pair, written beside
    the run (each process its own copy) for the training data to read."""
    out = _reference_path(cfg)
    if out is None:
        raise TrainConfigError(
            "--precompute-reference needs --checkpoint-dir to write its pass into"
        )
    params = start if start is not None else init_params(config, cfg.seed)
    return reference_logps(
        params, config, cfg.data.paths, out, tokenizer, cfg.data.seq_len, cfg.data.batch
    )


def training_batches(
    cfg: TrainConfig, tokenizer: Any, shard_index: int, shard_count: int
) -> grain.IterDataset:
    """The run's data stream for one data shard: packed documents, packed preference pairs
    (read from the reference pass's output when there is one), or GRPO's prompts."""
    if cfg.objective == "grpo":
        return prompt_batches(
            read_prompts(cfg.grpo.prompts, tokenizer),
            cfg.grpo.prompts_per_step,
            seed=cfg.seed,
            shard_index=shard_index,
            shard_count=shard_count,
        )
    if cfg.objective in ("dpo", "reward"):
        reference = _reference_path(cfg)
        paths = cfg.data.paths
        precomputed = cfg.objective == "dpo" and cfg.dpo.reference == "precomputed"
        if precomputed and reference is not None and reference.is_file():
            paths = (str(reference),)
        return make_preference_dataset(
            paths,
            tokenizer,
            cfg.data,
            seed=cfg.seed,
            shard_index=shard_index,
            shard_count=shard_count,
        )
    return make_dataset(
        open_documents(cfg.data.paths),
        tokenizer,
        cfg.data,
        seed=cfg.seed,
        shard_index=shard_index,
        shard_count=shard_count,
    )
