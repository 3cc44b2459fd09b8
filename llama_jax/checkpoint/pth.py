"""PyTorch `.pth` state dicts, read and written without torch and without running pickled code.

A `torch.save` file is a zip: `<archive>/data.pkl` (a pickle describing the tensors) plus one
uncompressed entry `<archive>/data/<key>` per storage. Unpickling arbitrary files runs arbitrary
code, so `_StateDictUnpickler.find_class` admits only the few globals a state dict names, each
mapped to an inert stand-in defined here: any other global (os.system, builtins.eval, ...) is
refused at the moment the pickle names it, before it could be called. Tensor data is then read by
memory-mapping the storage entry inside the zip, so nothing is loaded until a block is asked for.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.checkpoint.errors import CheckpointError

# torch storage class -> numpy dtype (None: a known torch storage whose dtype we do not load).
STORAGE_DTYPES: dict[str, np.dtype | None] = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": None,
    "LongStorage": None,
    "IntStorage": None,
    "ShortStorage": None,
    "CharStorage": None,
    "ByteStorage": None,
    "BoolStorage": None,
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if dtype is not None}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` etc.: only carries the element dtype."""

    name: str
    dtype: np.dtype | None


@dataclass(frozen=True)
class _Storage:
    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class PthTensor:
    """One tensor of a `.pth` file, not yet read: where its elements live and how they are laid
    out (torch's storage offset, size and stride, in elements)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype | None:
        return self.storage.type.dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return PthTensor(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED` globals, to inert stand-ins."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to unpickle global {module}.{name} (a state dict needs "
                "only tensors, storages and OrderedDict); nothing in the file was executed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
        ):
            raise CheckpointError(f"{self.source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return _Storage(str(key), storage_type, int(numel))


class PthFile:
    """A torch-saved state dict: `names()`, and `array(name)`, a fresh read-only memory map of
    one tensor (opened per call so pages are released once the caller drops it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = {i.filename: i for i in zf.infolist()}
                pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    raise CheckpointError(f"{self.path}: no data.pkl record; not a torch.save file")
                self._prefix = pkl[0][: -len("data.pkl")]
                data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: unreadable zip archive ({e}); truncated?") from e
        self._infos = infos
        try:
            state = _StateDictUnpickler(data, str(self.path)).load()
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.path}: malformed state-dict pickle ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, PthTensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: not a flat state dict of tensors")
        self.tensors: dict[str, PthTensor] = dict(state)
        self._data_offsets: dict[str, int] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def _storage_offset(self, name: str, storage: _Storage, itemsize: int) -> int:
        """Byte offset of a storage entry's data in the file (read from its local zip header),
        checked to lie wholly inside the file."""
        if storage.key in self._data_offsets:
            return self._data_offsets[storage.key]
        entry = f"{self._prefix}data/{storage.key}"
        info = self._infos.get(entry)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name}: storage record {entry} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: tensor {name}: storage {entry} is compressed")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: tensor {name}: bad zip header; truncated?")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            size = f.seek(0, io.SEEK_END)
        need = storage.numel * itemsize
        if info.file_size < need or offset + need > size:
            raise CheckpointError(
                f"{self.path}: tensor {name}: storage needs {need} bytes, file has "
                f"{min(info.file_size, max(size - offset, 0))}; truncated file?"
            )
        self._data_offsets[storage.key] = offset
        return offset

    def array(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only array over a memory map of the file."""
        t = self.tensors[name]
        dtype = t.dtype
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name}: dtype {t.storage.type.name} is not supported "
                "(float32, bfloat16, float16)"
            )
        offset = self._storage_offset(name, t.storage, dtype.itemsize)
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True)) + 1
        if min(t.shape, default=1) > 0 and (t.offset < 0 or extent > t.storage.numel):
            raise CheckpointError(f"{self.path}: tensor {name}: view exceeds its storage")
        if t.storage.numel == 0:
            return np.zeros(t.shape, dtype)
        flat = np.memmap(self.path, dtype, "r", offset=offset, shape=(t.storage.numel,))
        strides = tuple(s * dtype.itemsize for s in t.stride)
        return np.lib.stride_tricks.as_strided(flat[t.offset :], t.shape, strides, writeable=False)


# --- writing -----------------------------------------------------------------------------------


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 1 << 8:
        return pickle.BININT1 + bytes([n])
    if 0 <= n < 1 << 16:
        return pickle.BININT2 + struct.pack("<H", n)
    if -(1 << 31) <= n < 1 << 31:
        return pickle.BININT + struct.pack("<i", n)
    body = pickle.encode_long(n)
    return pickle.LONG1 + bytes([len(body)]) + body


def _pickle_str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _pickle_ints(values: Iterable[int]) -> bytes:
    return pickle.MARK + b"".join(_pickle_int(v) for v in values) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _state_dict_pickle(entries: list[tuple[str, str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The `data.pkl` torch writes for an OrderedDict of contiguous tensors, written opcode by
    opcode (pickling stand-ins would need torch importable to resolve the globals)."""
    ordered_dict = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    out = [pickle.PROTO + b"\x02", ordered_dict, pickle.MARK]
    for name, key, dtype, shape in entries:
        stride = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
        storage = (
            pickle.MARK
            + _pickle_str("storage")
            + _global("torch", _STORAGE_NAMES[dtype])
            + _pickle_str(key)
            + _pickle_str("cpu")
            + _pickle_int(int(np.prod(shape)))
            + pickle.TUPLE
            + pickle.BINPERSID
        )
        args = (
            storage
            + _pickle_int(0)
            + _pickle_ints(shape)
            + _pickle_ints(stride)
            + pickle.NEWFALSE
            + ordered_dict
        )
        rebuild = _global("torch._utils", "_rebuild_tensor_v2")
        out.append(_pickle_str(name) + rebuild + pickle.MARK + args + pickle.TUPLE + pickle.REDUCE)
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


_ALIGN = 64  # torch aligns storages to 64 bytes so they can be memory-mapped


def _aligned_info(zf: zipfile.ZipFile, name: str, nbytes: int, zip64: bool) -> zipfile.ZipInfo:
    """A stored entry whose data starts on a 64-byte boundary, padded by an extra field the way
    torch's writer does."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = (-(zf.fp.tell() + header)) % _ALIGN
    info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
    return info


def write_pth(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write a state dict torch can `torch.load(weights_only=True)`, one tensor at a time (each
    array can be dropped by the caller as soon as it is written)."""
    path = Path(path)
    prefix = path.name.removesuffix(".pth")
    entries = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, (name, array) in enumerate(tensors):
            array = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d 1-d)
            if array.dtype not in _STORAGE_NAMES:
                raise CheckpointError(f"{path}: tensor {name}: dtype {array.dtype} not supported")
            zip64 = array.nbytes * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides
            info = _aligned_info(zf, f"{prefix}/data/{key}", array.nbytes, zip64)
            with zf.open(info, "w", force_zip64=zip64) as f:
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
            entries.append((name, str(key), array.dtype, array.shape))
        zf.writestr(f"{prefix}/data.pkl", _state_dict_pickle(entries))
        zf.writestr(f"{prefix}/version", "3\n")
