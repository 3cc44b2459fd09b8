"""Sharding: one model from 1 CPU device to a multi-slice TPU pod.

- `sharding.mesh`: `make_mesh("fsdp=-1,tensor=4")`, ICI and DCN (multi-slice) factors.
- `sharding.rules`: the logical-axis rule table and its presets (fsdp, fsdp_tp, dp, infer_tp),
  `param_shardings`, `logical_to_sharding`, `with_rules` (activation constraints).
- `sharding.place`: params, train/optimizer state, batches and KV caches onto a mesh.
- `sharding.distributed`: multi-host start-up and per-process batch feeding.
- `python -m sharding.aot`: compile a train/decode step for a TPU topology on a CPU machine.
- `python -m sharding.golden`: check/regenerate the committed per-parameter specs
  (`tests/golden/`).

This file imports nothing, so that `python -m sharding.aot` picks the JAX platform before JAX
loads.
"""
