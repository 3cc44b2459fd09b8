"""Training and post-training: pretraining, SFT, LoRA, DPO and distillation with packed
documents, Orbax checkpoints, metrics.

- `train.config`: `TrainConfig` (one YAML file from `configs/` + command-line overrides).
- `train.data`: documents (text, JSONL, chat JSONL, prompt-completion JSONL,
  `builtin:arithmetic`) -> packed rows with per-document positions and segment ids, a grain
  pipeline whose position is checkpointed.
- `train.preference`: preference pairs (DPO) -> rows that pack both halves of each pair.
- `train.optim`: AdamW with the Llama 3 schedule (`make_optimizer`).
- `train.step`: the pure train step of any objective (`build_step`, `Policy`, `TrainState`,
  `lm_objective`, `build_train_step`, `abstract_train_state`).
- `train.dpo`, `train.distill`: the DPO and distillation objectives, the reference pass and
  the teacher's top-K dumps; `train.objectives` picks one for a run, with its frozen trees.
- `train.generations`: inference outputs -> an SFT set (`python -m llama_jax.post to-sft`).
- `train.rejection`: best-of-n samples by a reward -> an SFT set (`python -m llama_jax.post
  rejection-sample`).
- `train.prompts`, `train.rewards`: prompts with reference answers, and rewards of sampled
  completions (exact, regex, arithmetic, a reward model, a user's function).
- `train.reward_model`: Bradley-Terry training of a scalar-head reward model (`objective:
  reward`) and a trained one as a reward.
- `train.grpo`, `train.rollouts`: GRPO's loss, advantages and round batches, and the loop in
  which the inference engine samples the trainer's weights (`python -m llama_jax.post grpo`).
- `train.checkpoint`: the run's Orbax manager, SIGTERM handling.
- `train.metrics`: the FLOP formula behind MFU, console / TensorBoard / JSONL sinks.
- `train.loop`: `run(TrainConfig)` and `dump_teacher`, what `python -m llama_jax.train` calls.
- `train.corpus`: the built-in synthetic arithmetic corpus; `train.tokenizers`: which tokenizer.
"""
