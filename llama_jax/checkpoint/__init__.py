"""Checkpoint import and export: Meta `.pth` shards, Hugging Face safetensors, Orbax."""
