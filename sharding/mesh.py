"""Device meshes from a one-line spec, the same code path from 1 CPU device to a TPU pod.

A spec names mesh axes and their sizes, e.g. ``"fsdp=-1,tensor=4"`` or ``"data=2:dcn,fsdp=-1"``:

- axes are ``data``, ``fsdp``, ``sequence``, ``tensor``, always laid out in that order (least to
  most communication-hungry, which is what `mesh_utils` expects for ICI placement);
- ``name=N`` is an ICI factor (within a slice), ``name=N:dcn`` a DCN factor (across slices); an
  axis may have both, its size is their product;
- one ``-1`` per level means "the rest" of the devices of a slice (ICI) or of the slices (DCN);
- with several slices and no DCN factor, the slices go on ``data`` (pure data parallelism
  across the slow network is the usual choice).

Axes missing from the spec still exist with size 1 (except ``sequence``, present only when
named), so sharding rules can always name ``data``/``fsdp``/``tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils

AXES = ("data", "fsdp", "sequence", "tensor")
ALWAYS = ("data", "fsdp", "tensor")


class ShardingError(ValueError):
    """A mesh, rule or array shape that does not fit together; the message says what does not
    divide what."""


@dataclass(frozen=True)
class MeshSpec:
    """Parsed mesh spec: per-axis ICI and DCN factors, ``-1`` at most once per level."""

    ici: dict[str, int] = field(default_factory=dict)
    dcn: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | Mapping[str, int | str] | MeshSpec | None) -> MeshSpec:
        """Read ``"fsdp=-1,tensor=4"``, ``{"fsdp": -1, "data": "2:dcn"}``, or ``""``/``"1"``/None
        (a single device)."""
        if isinstance(spec, MeshSpec):
            return spec
        if spec is None or (isinstance(spec, str) and spec.strip() in ("", "1")):
            return cls()
        if isinstance(spec, str):
            items = []
            for part in spec.split(","):
                name, sep, value = part.partition("=")
                if not sep:
                    raise ShardingError(f"mesh spec item {part!r} is not NAME=SIZE[:dcn]")
                items.append((name.strip(), value.strip()))
        else:
            items = [(name, str(value)) for name, value in spec.items()]
        ici: dict[str, int] = {}
        dcn: dict[str, int] = {}
        for name, value in items:
            if name not in AXES:
                raise ShardingError(f"unknown mesh axis {name!r}; axes are {', '.join(AXES)}")
            size_text, _, level = value.partition(":")
            if level not in ("", "ici", "dcn"):
                raise ShardingError(f"mesh axis {name}: level must be ici or dcn, got {level!r}")
            try:
                size = int(size_text)
            except ValueError:
                raise ShardingError(f"mesh axis {name}: size {size_text!r} is not an int") from None
            if size == 0 or size < -1:
                raise ShardingError(f"mesh axis {name}: size must be positive or -1, got {size}")
            table = dcn if level == "dcn" else ici
            if name in table:
                raise ShardingError(f"mesh axis {name} given twice at the {level or 'ici'} level")
            table[name] = size
        for level, table in (("ici", ici), ("dcn", dcn)):
            if list(table.values()).count(-1) > 1:
                raise ShardingError(f"at most one -1 per level, got several at {level}: {table}")
        return cls(ici, dcn)

    def axis_names(self) -> tuple[str, ...]:
        named = set(self.ici) | set(self.dcn)
        return tuple(a for a in AXES if a in ALWAYS or a in named)

    def resolve(self, n_devices: int, n_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
        """Concrete (ici, dcn) sizes for every axis, for `n_devices` split into `n_slices`."""
        if n_devices % n_slices:
            raise ShardingError(f"{n_devices} devices do not split into {n_slices} equal slices")
        dcn = dict(self.dcn) if self.dcn else {"data": n_slices}
        per_slice = n_devices // n_slices
        return (
            _fill(self.ici, per_slice, self.axis_names(), "devices of a slice"),
            _fill(dcn, n_slices, self.axis_names(), "slices"),
        )

    def sizes(self, n_devices: int, n_slices: int = 1) -> dict[str, int]:
        """Total size of each mesh axis (ICI x DCN)."""
        ici, dcn = self.resolve(n_devices, n_slices)
        return {a: ici[a] * dcn[a] for a in self.axis_names()}


def _fill(
    factors: Mapping[str, int], total: int, names: Sequence[str], what: str
) -> dict[str, int]:
    known = math.prod(s for s in factors.values() if s != -1)
    shown = ",".join(f"{a}={s}" for a, s in factors.items()) or "(none)"
    if -1 in factors.values():
        if total % known:
            raise ShardingError(f"mesh {shown}: {known} does not divide the {total} {what}")
        factors = {a: (total // known if s == -1 else s) for a, s in factors.items()}
    elif known != total:
        raise ShardingError(
            f"mesh {shown} uses {known} {what} but there are {total}; use -1 on one axis for "
            "the rest"
        )
    return {a: factors.get(a, 1) for a in names}


def _slice_count(devices: Sequence[Any], spec: MeshSpec) -> tuple[int, bool]:
    """Number of DCN granules and whether they are processes (not TPU slices).

    TPU devices carry their slice (`slice_index`); elsewhere (CPU/GPU clusters) a spec with DCN
    factors treats each process as a granule, and one without them sees a single granule.
    """
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), False
    if spec.dcn:
        return len({d.process_index for d in devices}), True
    return 1, False


def make_mesh(
    spec: str | Mapping[str, int | str] | MeshSpec | None, devices: Sequence[Any] | None = None
) -> jax.sharding.Mesh:
    """A `Mesh` over `devices` (default: all devices) shaped by `spec`.

    Devices are placed by `mesh_utils`, which follows the physical TPU torus (and multi-slice
    DCN granules) and falls back to device order elsewhere.
    """
    devices = list(jax.devices() if devices is None else devices)
    ms = MeshSpec.parse(spec)
    n_slices, by_process = _slice_count(devices, ms)
    ici, dcn = ms.resolve(len(devices), n_slices)
    names = ms.axis_names()
    ici_shape = [ici[a] for a in names]
    if n_slices == 1:
        grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            [dcn[a] for a in names],
            devices,
            process_is_granule=by_process,
            allow_split_physical_axes=True,
        )
    return jax.sharding.Mesh(np.asarray(grid), names)
