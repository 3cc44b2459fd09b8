"""Silent data corruption checks: a step computed again on other devices, and replica checksums.

A faulty chip can return wrong numbers without any error. Every `sdc_check_every` steps the
step is run twice on the same inputs: as usual, and on a copy of the mesh whose devices are
rotated (within each process), so that every shard of the work is done by another device. The
program is the same one (the same HLO, the same logical reductions in the same order), so on a
deterministic backend the two outputs (new parameters, optimizer state and metrics, which hold
the gradients' update and norm) are bitwise equal; any difference names the step, the array,
the slice and the two devices. Outputs are compared by per-device checksums (below), not
copied to the host. XLA's CPU and TPU backends are deterministic; a backend whose
reductions are not (GPU atomics) needs `--xla_gpu_deterministic_ops=true` for this check. With a
single device per process there is no other device: the recomputation then only catches faults
that do not repeat.

Before a checked step, the shards of each state array that should be equal (replicas of the
same slice, e.g. every data-parallel copy of a replicated weight) are compared by checksum,
computed on each device from its own buffer (`shard_map`), so only one number per shard crosses
to the host: this covers the updates of the unchecked steps since the last check, which the
recomputation does not.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

EXIT_CODE = 75  # EX_TEMPFAIL: the run may go on from its last checkpoint on healthy devices

# (state, batch, frozen) -> (state, metrics), jitted for one mesh
StepFn = Callable[[Any, Any, Any], tuple[Any, Any]]


class SilentDataCorruption(RuntimeError):
    """Two computations that must agree bitwise did not; the message names the step and the
    devices."""

    exit_code = EXIT_CODE


def rotated_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with each process's devices moved one place along the mesh's flat order: every
    position is computed by another device of the same process (no data crosses hosts)."""
    flat = mesh.devices.ravel().copy()
    for process in {d.process_index for d in flat}:
        positions = [i for i, d in enumerate(flat) if d.process_index == process]
        flat[positions] = np.roll(flat[positions], 1)
    return Mesh(flat.reshape(mesh.devices.shape), mesh.axis_names)


def on_mesh(shardings: Any, mesh: Mesh) -> Any:
    """A tree of NamedShardings moved onto `mesh` (same specs)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s.spec), shardings)


class SdcCheck:
    """Runs the checked steps. `compile_step(mesh)` jits the training step for a mesh (the
    loop's own recipe), so the recomputation is compiled once, on the first checked step."""

    def __init__(self, every: int, mesh: Mesh, compile_step: Callable[[Mesh], StepFn]):
        self.every = every
        self.mesh = rotated_mesh(mesh)
        self._moves = dict(zip(mesh.devices.flat, self.mesh.devices.flat, strict=True))
        self._compile = compile_step
        self._step_fn: StepFn | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, step: int, step_fn: StepFn, state: Any, batch: Any, frozen: Any) -> tuple:
        """`step_fn(state, batch, frozen)`, its input state checked for equal replicas and its
        output against its recomputation on the rotated mesh; raises SilentDataCorruption."""
        check_replicas(step - 1, state)
        inputs = jax.tree.map(self._moved, (state, batch, frozen))
        new_state, metrics = step_fn(state, batch, frozen)
        if self._step_fn is None:
            self._step_fn = self._compile(self.mesh)
        for got, again in zip((new_state, metrics), self._step_fn(*inputs), strict=True):
            compare_outputs(step, got, again)
        return new_state, metrics

    def _moved(self, x: jax.Array) -> jax.Array:
        """`x` on the rotated mesh: each device's buffer copied as is to the device that takes
        its place (a copy per shard, no resharding program; a copy even onto the same device,
        as the checked step donates `x`)."""
        shards = [
            jax.device_put(s.data, self._moves[s.device], may_alias=False)
            for s in x.addressable_shards
        ]
        sharding = NamedSharding(self.mesh, x.sharding.spec)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def _leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path)


def _shards_by_index(x: jax.Array) -> dict[tuple, list[Any]]:
    """This process's shards of `x`, grouped by the slice of `x` they hold."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for shard in x.addressable_shards:
        groups[tuple((s.start, s.stop) for s in shard.index)].append(shard)
    return groups


def compare_outputs(step: int, got: Any, again: Any) -> None:
    """Every shard of `got` against the shard of `again` (the recomputation) holding the same
    slice, by checksum."""
    leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    sums, sums_again = device_checksums(got), device_checksums(again)
    for (path, x), y, by_device, by_device_again in zip(
        leaves, jax.tree.leaves(again), sums, sums_again, strict=True
    ):
        other = _shards_by_index(y)
        for index, shards in _shards_by_index(x).items():
            reference = other[index][0].device
            for shard in shards:
                if by_device[shard.device] != by_device_again[reference]:
                    raise SilentDataCorruption(
                        f"step {step}: silent data corruption: {_leaf_name(path)} slice {index} "
                        f"on {shard.device} differs from its recomputation on {reference}; "
                        f"stopping (exit {EXIT_CODE}): resume from the last checkpoint without "
                        "these devices"
                    )


def checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of `x`'s bits: sum of its words times odd weights (wrapping), so any
    single changed word changes it."""
    words = jax.lax.bitcast_convert_type(x.astype(_as_32_bits(x.dtype)), jnp.uint32).ravel()
    weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)


def _as_32_bits(dtype: Any) -> Any:
    """The 32-bit type `dtype` widens to without changing its bits' meaning."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.float32
    return jnp.uint32 if jnp.issubdtype(dtype, jnp.unsignedinteger) else jnp.int32


def device_checksums(tree: Any) -> list[dict[Any, int]]:
    """Per leaf of `tree` (NamedSharding arrays on one mesh), {device: checksum of its own
    buffer} for this process's devices; one program for the whole tree."""
    leaves = tuple(jax.tree.leaves(tree))
    specs = tuple(x.sharding.spec for x in leaves)
    sums = _checksums_program(leaves[0].sharding.mesh, specs)(leaves)
    return [{s.device: int(s.data[0]) for s in x.addressable_shards} for x in sums]


@functools.cache
def _checksums_program(mesh: Mesh, specs: tuple[PartitionSpec, ...]) -> Callable:
    """The jitted per-device checksums of arrays laid out by `specs` on `mesh`, built once per
    layout (a checked step would otherwise trace and compile it again)."""
    return jax.jit(
        jax.shard_map(
            lambda xs: tuple(checksum(x)[None] for x in xs),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=PartitionSpec(tuple(mesh.axis_names)),
            check_vma=False,
        )
    )


def check_replicas(step: int, state: Any) -> None:
    """The shards of each array of `state` (the state after update `step`) that hold the same
    slice have the same checksum."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, x), sums in zip(leaves, device_checksums(state), strict=True):
        for index, shards in _shards_by_index(x).items():
            devices = [s.device for s in shards]
            if len({sums[d] for d in devices}) > 1:
                found = ", ".join(f"{d}: {sums[d]:#010x}" for d in devices)
                raise SilentDataCorruption(
                    f"after step {step}: silent data corruption: the replicas of "
                    f"{_leaf_name(path)} slice {index} differ ({found}); stopping (exit "
                    f"{EXIT_CODE}): resume from the last checkpoint without these devices"
                )
