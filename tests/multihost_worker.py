"""A few train steps of a tiny model on a mesh; one process of a multi-host job when run as a
script, or the single-process reference when `train` is imported by the test.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT MESH OUT.npz

Each process feeds only its rows of every global batch (`sharding.distributed.process_rows`).
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np

RULES = "fsdp_tp"
STEPS = 3
BATCH, LENGTH = 8, 16


def global_batch_numpy(vocab: int) -> dict[str, np.ndarray]:
    """The whole global batch, deterministic, as every process could build it (the same at
    every step, so the loss must fall)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (BATCH, LENGTH + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH))
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.ascontiguousarray(positions),
        "segment_ids": np.ones((BATCH, LENGTH), np.int32),
        "loss_mask": np.ones((BATCH, LENGTH), np.float32),
    }


def train(mesh_spec: str) -> dict[str, np.ndarray]:
    """Losses of `STEPS` AdamW steps and the final parameters (flattened, on every process),
    plus the rows this process fed."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from llama_jax.config import preset
    from sharding import distributed, place
    from sharding.mesh import make_mesh
    from sharding.rules import with_rules
    from train.optim import OptimConfig, make_optimizer
    from train.step import abstract_train_state, build_train_step, init_train_state

    config = preset("tiny")
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1))
    mesh = make_mesh(mesh_spec)
    shardings = place.tree_shardings(abstract_train_state(config, optimizer), config, mesh, RULES)
    state = jax.jit(partial(init_train_state, config, optimizer, 0), out_shardings=shardings)()
    step = jax.jit(
        with_rules(build_train_step(config, optimizer), mesh, RULES),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    full = global_batch_numpy(config.vocab_size)
    rows = distributed.process_rows((BATCH, LENGTH), mesh, RULES)
    losses = []
    for _ in range(STEPS):
        local = {k: v[rows] for k, v in full.items()}  # all a data loader would read
        state, metrics = step(state, distributed.global_batch(local, BATCH, mesh, RULES))
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    return {"losses": np.asarray(losses), "params": flat, "rows": np.array([rows.start, rows.stop])}


def main(process_id: str, num_processes: str, port: str, mesh_spec: str, out: str) -> None:
    from sharding.distributed import initialize

    initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    np.savez(out, **train(mesh_spec))


if __name__ == "__main__":
    main(*sys.argv[1:])
