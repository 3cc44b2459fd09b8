"""The cuDNN attention path, checked on CPU: which kernel "auto" picks, and the arguments of the
`jax.nn.dot_product_attention` call, run with `implementation="xla"` against our plain
attention (alone, inside the model with gradients, and under a mesh)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import cudnn_attention, model
from llama_jax.config import preset
from sharding import place
from sharding.mesh import make_mesh
from sharding.rules import with_rules

TINY = preset("tiny", compute_dtype="bfloat16")  # 4 heads over 2 kv heads, head_dim 16
PACKED = np.array([[1] * 10 + [2] * 14 + [0] * 8, [1] * 32], np.int32)  # 2 docs + padding; 1 doc
XLA_CALL = partial(cudnn_attention.cudnn_attention, implementation="xla")


def _qkv(heads: int, kv_heads: int, dtype=jnp.float32, batch=2, time=32, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, time, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, time, kv_heads, head_dim), dtype) for key in keys[1:])
    return q, k, v


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("segment_ids", [None, PACKED], ids=["causal", "packed"])
def test_the_call_matches_plain_attention(kv_heads, segment_ids):
    q, k, v = _qkv(4, kv_heads)
    ids = None if segment_ids is None else jnp.asarray(segment_ids)
    expected = model.grouped_attention(q, k, v, model.attention_mask(ids, q.shape[:2]))
    np.testing.assert_allclose(XLA_CALL(q, k, v, ids), expected, atol=1e-5, rtol=1e-5)


def _fake_device(platform: str, capability: str | None = None):
    return SimpleNamespace(platform=platform, compute_capability=capability)


@pytest.mark.parametrize(
    "device, expected",
    [
        (_fake_device("gpu", "9.0"), True),
        (_fake_device("gpu", "8.0"), True),
        (_fake_device("gpu", "7.0"), False),  # Volta: no flash attention in cuDNN
        (_fake_device("gpu", "gfx942"), False),  # ROCm
        (_fake_device("tpu"), False),
        (_fake_device("cpu"), False),
    ],
)
def test_on_gpu_means_an_nvidia_gpu_of_ampere_or_later(monkeypatch, device, expected):
    monkeypatch.setattr(cudnn_attention, "traced_device", lambda: device)
    assert cudnn_attention.on_gpu() is expected


@pytest.mark.parametrize(
    "config, time, expected",
    [
        (TINY, 32, "cudnn"),
        (TINY.replace(compute_dtype="float16"), 32, "cudnn"),
        (TINY.replace(compute_dtype="float32"), 32, "xla"),  # cuDNN takes half precision only
        (TINY, 33, "xla"),  # odd length
        (preset("tiny", head_dim=256, compute_dtype="bfloat16"), 32, "xla"),
        (TINY.replace(attention="xla"), 32, "xla"),
    ],
)
def test_auto_takes_cudnn_on_nvidia_gpus_when_the_shapes_suit(monkeypatch, config, time, expected):
    monkeypatch.setattr(cudnn_attention, "on_gpu", lambda: True)
    assert model.attention_kernel(config, time) == expected
    monkeypatch.setattr(cudnn_attention, "on_gpu", lambda: False)
    assert model.attention_kernel(config, time) == "xla"


def test_auto_takes_xla_on_this_cpu():
    assert not cudnn_attention.on_gpu()
    assert model.attention_kernel(TINY, 32) == "xla"


def test_asking_for_cudnn_where_it_cannot_run_says_why():
    q, k, v = _qkv(4, 2)  # float32
    with pytest.raises(ValueError, match="attention='cudnn': cuDNN attention needs bfloat16"):
        cudnn_attention.cudnn_attention(q, k, v, None)


def _loss(params, batch, config):
    logits, _ = model.forward(
        params, batch["tokens"], segment_ids=batch["segment_ids"], config=config
    )
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])


def _batch(batch: int, time: int = 32) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (batch, time), dtype=np.int32)
    return {"tokens": tokens, "segment_ids": np.tile(PACKED, (batch // 2, 1))}


@pytest.fixture
def cudnn_runs_as_xla(monkeypatch):
    """The model's "cudnn" kernel, with the call it builds run by XLA (this CPU has no cuDNN)."""
    monkeypatch.setitem(model._KERNELS, "cudnn", XLA_CALL)


@pytest.mark.usefixtures("cudnn_runs_as_xla")
def test_the_model_through_the_cudnn_path_matches_xla():
    """Loss and gradients of packed rows, float32 so the comparison is tight."""
    config = TINY.replace(compute_dtype="float32")
    params = model.init_params(config, 0)
    batch = _batch(2)
    step = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
    expected = step(params, batch, config.replace(attention="xla"))
    actual = step(params, batch, config.replace(attention="cudnn"))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("cudnn_runs_as_xla")
def test_the_cudnn_path_partitions_under_a_mesh():
    """With the sequence split over devices, the call's inputs are regrouped to a heads split
    (what JAX's cuDNN partitioning accepts); the numbers match one device."""
    config = preset("tiny", n_heads=8, n_kv_heads=8, attention="cudnn")

    def run(spec, devices):
        mesh = make_mesh(spec, devices)
        params = place.place(jax.device_get(model.init_params(config, 0)), config, mesh, "fsdp_tp")
        batch = place.place_batch(_batch(8), mesh, "fsdp_tp")
        step = jax.value_and_grad(partial(_loss, config=config))
        return jax.device_get(jax.jit(with_rules(step, mesh, "fsdp_tp"))(params, batch))

    expected = run("1", jax.devices()[:1])
    actual = run("fsdp=2,sequence=2,tensor=2", None)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4)
