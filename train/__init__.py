"""Training: pretraining and fine-tuning with packed documents, Orbax checkpoints, metrics.

- `train.config`: `TrainConfig` (one YAML file from `configs/` + command-line overrides).
- `train.data`: documents (text, JSONL, chat JSONL, `builtin:arithmetic`) -> packed rows with
  per-document positions and segment ids, a grain pipeline whose position is checkpointed.
- `train.optim`: AdamW with the Llama 3 schedule (`make_optimizer`).
- `train.step`: the pure train step (`TrainState`, `build_train_step`, `abstract_train_state`).
- `train.checkpoint`: the run's Orbax manager, SIGTERM handling, `load_run_params`.
- `train.metrics`: the FLOP formula behind MFU, console / TensorBoard / JSONL sinks.
- `train.loop`: `run(TrainConfig)`, what `python -m llama_jax.train` calls.
- `train.corpus`: the built-in synthetic arithmetic corpus; `train.tokenizers`: which tokenizer.
"""
