"""Safetensors files and Hugging Face shard sets, read by memory map, written tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range) and the raw data. We parse the header ourselves and memory-map each tensor (the
`safetensors` package's numpy API copies whole tensors and has no bfloat16), and we write shards
ourselves so each tensor is produced, written and dropped one at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.checkpoint.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class _Entry:
    dtype: np.dtype | None
    dtype_code: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


class SafetensorsFile:
    """One `.safetensors` file: validated header; `array(name)` memory-maps one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: shorter than a safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise CheckpointError(f"{self.path}: header length {n} is implausible")
                header_bytes = f.read(n)
                size = f.seek(0, 2)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        if len(header_bytes) < n:
            raise CheckpointError(f"{self.path}: header cut short; truncated file?")
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, 8 + n, size)

    def _entry(self, name: str, info: dict, base: int, size: int) -> _Entry:
        try:
            code, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name}: malformed header entry") from None
        dtype = DTYPES.get(code)
        if dtype is not None and end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name}: byte range disagrees with shape")
        if base + end > size or begin > end:
            raise CheckpointError(
                f"{self.path}: tensor {name}: data ends at byte {base + end}, file has {size}; "
                "truncated file?"
            )
        return _Entry(dtype, code, shape, base + begin)

    def names(self) -> list[str]:
        return list(self.entries)

    def array(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name}: dtype {e.dtype_code} is not supported (F32, BF16, F16)"
            )
        if int(np.prod(e.shape)) == 0:
            return np.zeros(e.shape, e.dtype)
        return np.memmap(self.path, e.dtype, "r", offset=e.offset, shape=e.shape)


class SafetensorsSet:
    """A Hugging Face weight set: `model.safetensors`, or shards listed by the index file."""

    def __init__(self, directory: str | Path):
        root = Path(directory)
        index = root / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        elif (root / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(SafetensorsFile(root / SINGLE_FILE).names(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.files: dict[str, SafetensorsFile] = {}
        for name, file in weight_map.items():
            if file not in self.files:
                if not (root / file).is_file():
                    raise CheckpointError(f"{root / file}: missing shard (holds tensor {name})")
                self.files[file] = SafetensorsFile(root / file)
            if name not in self.files[file].entries:
                raise CheckpointError(f"{root / file}: tensor {name}: listed in index, not in file")
        self.weight_map = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file(self, name: str) -> SafetensorsFile:
        return self.files[self.weight_map[name]]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype up front (headers come first), and a
    function producing its data only when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def _write_file(path: Path, tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        if t.dtype not in _CODES:
            raise CheckpointError(f"{path}: tensor {t.name}: dtype {t.dtype} not supported")
        header[t.name] = {
            "dtype": _CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            data = np.asarray(t.produce(), dtype=t.dtype, order="C")
            if data.shape != t.shape:
                raise CheckpointError(f"{path}: tensor {t.name}: produced shape {data.shape}")
            f.write(memoryview(data.reshape(-1).view(np.uint8)))


def write_sharded(
    directory: str | Path,
    tensors: Sequence[PlannedTensor],
    max_shard_bytes: int = 5 << 30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `tensors` as HF shards (`model-0000i-of-0000n.safetensors` + index), or as one
    `model.safetensors` when they fit in one shard. Returns the files written."""
    root = Path(directory)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        _write_file(root / SINGLE_FILE, shards[0], meta)
        return [root / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        _write_file(root / name, shard, meta)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: name for name, s in zip(names, shards, strict=True) for t in s},
    }
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [root / n for n in names]
