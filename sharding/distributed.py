"""Multi-host start-up and per-process batch feeding.

Every process of a multi-host job runs the same program over one global mesh; each owns a few
devices and must feed exactly the rows of the global batch that land on them. `process_rows`
says which rows those are (from the batch sharding, not from an assumed layout) and
`global_batch` assembles the process-local rows into global arrays without any process ever
holding the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from llama_jax.partitioning import BATCH_AXES
from sharding.mesh import ShardingError
from sharding.place import batch_shardings
from sharding.rules import Mesh, Rules, logical_to_sharding


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Join the job's processes. Call once, first thing, before any other JAX call.

    On Cloud TPU VMs (and under SLURM, Open MPI or a Kubernetes JobSet) JAX finds the
    coordinator, process count and id itself: call with no arguments. Elsewhere pass them (or
    set JAX_COORDINATOR_ADDRESS and give the rest). CPU collectives go over gloo, so a
    multi-process CPU job (tests, debugging) works without accelerators.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def process_rows(global_shape: Sequence[int], mesh: Mesh, rules: str | Rules) -> slice:
    """The rows of a global [batch, ...] batch that this process must load.

    Read off the batch sharding, not assumed from the process index: processes whose devices
    hold the same rows (replicas, e.g. over a tensor axis) get the same slice. Raises if the
    rows are not one contiguous block, which no mesh from `make_mesh` produces.
    """
    names = BATCH_AXES[: len(global_shape)]
    sharding = logical_to_sharding(names, mesh, rules, global_shape, "batch")
    blocks = sorted(
        {
            index[0].indices(global_shape[0])[:2]
            for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values()
        }
    )
    start, stop = blocks[0][0], blocks[-1][1]
    if sum(b - a for a, b in blocks) != stop - start:
        raise ShardingError(f"process {jax.process_index()} holds non-contiguous rows {blocks}")
    return slice(start, stop)


def global_batch(
    local: Mapping[str, np.ndarray], global_size: int, mesh: Mesh, rules: str | Rules
) -> dict[str, jax.Array]:
    """Global batch arrays from this process's rows (`local[k]` = the global rows
    `process_rows(...)` of `k`), sharded by the rules' batch axes."""
    shapes = {k: (global_size, *v.shape[1:]) for k, v in local.items()}
    abstract = {k: jax.ShapeDtypeStruct(shapes[k], v.dtype) for k, v in local.items()}
    shardings = batch_shardings(abstract, mesh, rules)
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k])
        for k, v in local.items()
    }
