"""The torch-free `.pth` reader/writer: exact values, torch compatibility, and refusal of any
pickle that asks for more than a state dict needs."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.pth import PthFile, write_pth


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        bf16=torch.randn(5, 2, generator=g).to(torch.bfloat16),
        f16=torch.randn(7, generator=g).half(),
        transposed=torch.randn(4, 3, generator=g).t(),  # non-contiguous strides
        window=torch.randn(6, 6, generator=g)[1:4, 2:5],  # storage offset + strides
        scalar=torch.tensor(2.5),
    )


@pytest.mark.slow
def test_reads_torch_save_exactly(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "x.pth")
    f = PthFile(tmp_path / "x.pth")
    assert f.names() == list(state_dict)
    for name, t in state_dict.items():
        got = f.array(name)
        assert got.shape == tuple(t.shape)
        assert str(got.dtype) == str(t.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


@pytest.mark.slow
def test_written_files_load_in_torch_bit_exact(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "src.pth")
    src = PthFile(tmp_path / "src.pth")
    write_pth(tmp_path / "out.pth", ((n, src.array(n)) for n in src.names()))
    for mmap in (False, True):  # mmap=True also checks the 64-byte storage alignment
        back = torch.load(tmp_path / "out.pth", weights_only=True, mmap=mmap)
        assert list(back) == list(state_dict)
        for name, t in state_dict.items():
            assert back[name].dtype == t.dtype
            assert torch.equal(back[name], t)


class _Exploit:
    """Pickles to a call of `fn(*args)`, the classic malicious-pickle payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _zip_with_pickle(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("how", ["os.system", "eval", "nested-in-state-dict"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = {
        "os.system": _Exploit(os.system, command),
        "eval": _Exploit(eval, f"open({str(marker)!r}, 'w').close()"),
        "nested-in-state-dict": collections.OrderedDict(w=_Exploit(os.system, command)),
    }[how]
    _zip_with_pickle(tmp_path / "evil.pth", pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refusing to unpickle global"):
        PthFile(tmp_path / "evil.pth")
    assert not marker.exists()
    # Sanity check that the payload is live: plain pickle would run it.
    pickle.loads(pickle.dumps(payload, protocol=2))
    assert marker.exists()


def test_truncated_file_names_file_and_tensor(tmp_path, state_dict):
    write_pth(tmp_path / "ok.pth", [("a", np.ones((64, 64), np.float32))])
    data = (tmp_path / "ok.pth").read_bytes()
    # Cut inside the storage but keep the central directory: rebuild the zip with a short entry.
    with (
        zipfile.ZipFile(tmp_path / "ok.pth") as src,
        zipfile.ZipFile(tmp_path / "short.pth", "w") as dst,
    ):
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, body[:100] if info.filename.endswith("data/0") else body)
    with pytest.raises(CheckpointError, match=r"short\.pth: tensor a: storage needs 16384 bytes"):
        PthFile(tmp_path / "short.pth").array("a")
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: unreadable zip archive"):
        PthFile(tmp_path / "cut.pth")


def test_unsupported_dtype_names_tensor(tmp_path):
    torch.save({"ids": torch.arange(4)}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"ints\.pth: tensor ids: dtype LongStorage"):
        PthFile(tmp_path / "ints.pth").array("ids")
