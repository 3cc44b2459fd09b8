"""Lazy arrays: read only the block a device needs from memory-mapped checkpoint tensors.

A checkpoint tensor is seen through a `View` (reshape + transpose + optional gather on one axis,
applied at read time to a memory map) and Meta model-parallel ranks are joined by a `Concat`
that reads only the ranks a block overlaps. Nothing is read until `read_into(index, out)`.

Host memory: a block is copied in chunks of contiguous source rows, and the file pages each
chunk touched are dropped from this process (`MADV_DONTNEED`; they stay in the page cache), so
reading a tensor costs its output buffer plus one chunk, not also a resident copy of the file.
`read` returns a 64-byte-aligned buffer, which jax's CPU backend adopts without copying.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Index = tuple[slice, ...]
CHUNK_BYTES = 8 << 20
_ALIGN = 64


class LazyArray(Protocol):
    """Something with a shape and dtype whose blocks can be copied into numpy arrays."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read_into(self, index: Index, out: np.ndarray) -> None:
        """Copy (casting to `out.dtype`) the block `index` (unit-step slices) into `out`."""
        ...


def full_index(shape: Sequence[int], index: Sequence[slice] | None = None) -> Index:
    """`index` padded to one normalised (start, stop, step 1) slice per axis of `shape`."""
    given = tuple(index or ())
    given = given + (slice(None),) * (len(shape) - len(given))
    out = []
    for s, n in zip(given, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only unit-step slices are supported, got {s}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def read(array: LazyArray, index: Sequence[slice] | None = None, dtype=None) -> np.ndarray:
    """A fresh aligned array holding block `index` of `array` (all of it by default)."""
    index = full_index(array.shape, index)
    out = aligned_empty(tuple(s.stop - s.start for s in index), dtype or array.dtype)
    array.read_into(index, out)
    return out


def _drop_pages(array: np.ndarray) -> None:
    """Drop from this process the file pages `array`'s memory map touched (they stay cached)."""
    node = array
    while node is not None:
        mm = getattr(node, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            mm.madvise(mmap.MADV_DONTNEED)
            return
        node = getattr(node, "base", None)


@dataclass(frozen=True)
class View:
    """`source()` reshaped to `split`, transposed by `axes`, then gathered by `perm` along
    `perm_axis` (the q/k rotary re-ordering). `source` is a callable so a memory map is opened
    only while a block is being read."""

    source: Callable[[], np.ndarray]
    source_dtype: np.dtype
    split: tuple[int, ...]
    axes: tuple[int, ...]
    perm_axis: int | None = None
    perm: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split[a] for a in self.axes)

    @property
    def dtype(self) -> np.dtype:
        return self.source_dtype

    def read_into(self, index: Index, out: np.ndarray) -> None:
        index = full_index(self.shape, index)
        source = self.source()
        view = source.reshape(self.split).transpose(self.axes)
        # Chunk along the axis holding the source's outermost dim: each chunk is then a
        # contiguous run of file rows.
        axis = self.axes.index(0)
        rows = index[axis]
        per_row = out.nbytes // max(rows.stop - rows.start, 1)
        step = max(1, CHUNK_BYTES // max(per_row, 1))
        for lo in range(rows.start, rows.stop, step):
            hi = min(lo + step, rows.stop)
            parts: list[slice | np.ndarray] = list(index)
            parts[axis] = slice(lo, hi)
            if self.perm_axis is not None:
                parts[self.perm_axis] = self.perm[index[self.perm_axis]]
            dest = [slice(None)] * out.ndim
            dest[axis] = slice(lo - rows.start, hi - rows.start)
            np.copyto(out[tuple(dest)], view[tuple(parts)], casting="unsafe")
            _drop_pages(source)


@dataclass(frozen=True)
class Concat:
    """Arrays joined along `axis`, read part by part (Meta model-parallel ranks)."""

    parts: tuple[LazyArray, ...]
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def read_into(self, index: Index, out: np.ndarray) -> None:
        index = full_index(self.shape, index)
        want, offset = index[self.axis], 0
        for part in self.parts:
            size = part.shape[self.axis]
            lo, hi = max(want.start, offset), min(want.stop, offset + size)
            if lo < hi:
                sub, dest = list(index), [slice(None)] * out.ndim
                sub[self.axis] = slice(lo - offset, hi - offset)
                dest[self.axis] = slice(lo - want.start, hi - want.start)
                part.read_into(tuple(sub), out[tuple(dest)])
            offset += size


@dataclass(frozen=True)
class Stack:
    """Per-layer arrays stacked on a new leading axis, read layer by layer into the output."""

    layers: tuple[LazyArray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers), *self.layers[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.layers[0].dtype

    def read_into(self, index: Index, out: np.ndarray) -> None:
        index = full_index(self.shape, index)
        for i in range(index[0].start, index[0].stop):
            self.layers[i].read_into(index[1:], out[i - index[0].start])
