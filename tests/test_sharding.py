"""Mesh specs, the rule table, and numerical equivalence of one model over many meshes
(8 emulated CPU devices, set by conftest)."""

from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import model as llama_model
from llama_jax import splash
from llama_jax.config import preset
from llama_jax.kv_cache import CACHE_AXES, KVCache, PagedKVCache
from llama_jax.partitioning import BATCH_AXES
from sharding import place
from sharding.mesh import MeshSpec, ShardingError, make_mesh
from sharding.rules import PRESETS, param_specs, with_rules

GQA = preset("tiny")  # 4 heads over 2 kv heads
WIDE = preset("tiny", n_heads=8, n_kv_heads=8)  # heads divide tensor=8


# --- mesh specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, devices, slices, sizes",
    [
        ("fsdp=-1,tensor=4", 64, 1, {"data": 1, "fsdp": 16, "tensor": 4}),
        ("data=2:dcn,fsdp=-1", 16, 2, {"data": 2, "fsdp": 8, "tensor": 1}),
        ("fsdp=-1", 16, 2, {"data": 2, "fsdp": 8, "tensor": 1}),  # slices default to data
        ("fsdp=2:dcn,fsdp=-1,tensor=2", 16, 2, {"data": 1, "fsdp": 8, "tensor": 2}),
        ("data=2,sequence=2,tensor=-1", 8, 1, {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}),
        ({"fsdp": -1, "data": "2:dcn"}, 8, 2, {"data": 2, "fsdp": 4, "tensor": 1}),
        ("1", 1, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_mesh_spec_sizes(spec, devices, slices, sizes):
    assert MeshSpec.parse(spec).sizes(devices, slices) == sizes


@pytest.mark.parametrize(
    "spec, devices, slices, message",
    [
        ("tensor=3,fsdp=-1", 8, 1, "3 does not divide the 8 devices of a slice"),
        ("data=2,fsdp=2", 8, 1, "uses 4 devices of a slice but there are 8"),
        ("data=4:dcn,fsdp=-1", 16, 2, "uses 4 slices but there are 2"),
        ("fsdp=-1,tensor=-1", 8, 1, "at most one -1"),
        ("model=2", 8, 1, "unknown mesh axis 'model'"),
        ("fsdp=two", 8, 1, "is not an int"),
        ("fsdp=4:nvlink", 8, 1, "level must be ici or dcn"),
    ],
)
def test_mesh_spec_errors(spec, devices, slices, message):
    with pytest.raises(ShardingError, match=message):
        MeshSpec.parse(spec).sizes(devices, slices)


def test_make_mesh_uses_the_devices_given():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert make_mesh("1", jax.devices()[:1]).devices.size == 1


# --- the rule table ----------------------------------------------------------------------------


def test_every_logical_name_has_a_rule_in_every_preset():
    names = {
        n
        for axes in jax.tree.leaves(llama_model.logical_axes(GQA), is_leaf=_is_names)
        for n in axes
    }
    names |= {
        llama_model.BATCH,
        llama_model.LENGTH,
        llama_model.EMBED,
        llama_model.HEADS,
        llama_model.KV_HEADS,
        llama_model.MLP,
        llama_model.VOCAB,
        splash.HEADS,
    }
    names |= set(CACHE_AXES) | set(BATCH_AXES)
    for rules in PRESETS.values():
        assert names <= set(rules)


def test_rules_say_what_does_not_divide():
    config = preset("llama3.1-8b")
    with pytest.raises(
        ShardingError,
        match=r"wk: dimension 2 \(kv_heads\) of size 8 does not "
        r"divide over tensor=16",
    ):
        param_specs(config, {"fsdp": 4, "tensor": 16}, "fsdp_tp")
    batch = {"tokens": np.zeros((6, 4), np.int32)}
    with pytest.raises(ShardingError, match=r"size 6 does not divide over data\*fsdp=4"):
        place.batch_shardings(batch, make_mesh("data=2,fsdp=2,tensor=2"), "fsdp_tp")


def test_axes_of_size_one_and_reused_axes_drop_out():
    specs = param_specs(preset("llama3.1-8b"), {"data": 2, "fsdp": 8, "tensor": 1}, "fsdp_tp")
    assert specs["layers"]["attention"]["wq"] == jax.sharding.PartitionSpec(None, "fsdp")
    assert specs["output"] == jax.sharding.PartitionSpec("fsdp")
    specs = param_specs(preset("llama3.1-8b"), {"fsdp": 4, "tensor": 2}, "fsdp")
    assert specs["output"] == jax.sharding.PartitionSpec(("fsdp", "tensor"))


def test_fsdp8_holds_one_eighth_of_every_parameter_per_device():
    mesh = make_mesh("fsdp=8")
    params = place.init_params(GQA, 0, mesh, "fsdp_tp")
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = {d: 0 for d in jax.devices()}
    for x in jax.tree.leaves(params):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert set(per_device.values()) == {total // 8}
    assert total % 8 == 0


def test_optimizer_state_follows_its_parameters():
    mesh = make_mesh("fsdp=-1,tensor=2")
    params = llama_model.param_shapes(GQA)
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    shardings = place.tree_shardings({"params": params, "opt": state}, GQA, mesh, "fsdp_tp")
    wq = shardings["params"]["layers"]["attention"]["wq"].spec
    assert wq == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    adam = shardings["opt"][0]
    assert adam.mu["layers"]["attention"]["wq"].spec == wq
    assert adam.nu["output"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert adam.count.spec == jax.sharding.PartitionSpec()


# --- the same numbers on every mesh ------------------------------------------------------------

MESHES = [
    ("fsdp=8", GQA),
    ("tensor=8", WIDE),
    ("data=2,fsdp=4", GQA),
    ("data=2,fsdp=2,tensor=2", GQA),
    ("data=2,sequence=2,tensor=2", GQA),
]


def _loss(params, batch, config):
    segment_ids = batch.get("segment_ids")
    logits, _ = llama_model.forward(params, batch["tokens"], config=config, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.mean(nll), logits


def _batch(config, batch=8, length=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, length + 1), dtype=np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


@cache
def _host_params(config):
    return jax.device_get(llama_model.init_params(config, 0))


def _run(spec, devices, config, rules):
    mesh = make_mesh(spec, devices)
    params = place.place(_host_params(config), config, mesh, rules)
    batch = place.place_batch(_batch(config), mesh, rules)
    step = jax.value_and_grad(partial(_loss, config=config), has_aux=True)
    (loss, logits), grads = jax.jit(with_rules(step, mesh, rules))(params, batch)
    return params, jax.device_get((loss, logits, grads))


@pytest.fixture(scope="module")
def references():
    return {id(c): _run("1", jax.devices()[:1], c, "fsdp_tp")[1] for c in (GQA, WIDE)}


def _close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(np.max(np.abs(e))) or 1.0
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("spec, config", MESHES, ids=[m for m, _ in MESHES])
def test_same_logits_loss_and_grads_on_every_mesh(spec, config, references):
    params, (loss, logits, grads) = _run(spec, None, config, "fsdp_tp")
    _close((loss, logits, grads), references[id(config)])
    wq = params["layers"]["attention"]["wq"]
    assert len(wq.sharding.device_set) == 8
    assert wq.addressable_shards[0].data.size < wq.size  # really split


@pytest.mark.parametrize(
    "spec, rules, config",
    [("data=2,fsdp=4", "fsdp", GQA), ("fsdp=2,sequence=2,tensor=2", "fsdp_tp", WIDE)],
)
def test_splash_kernel_matches_plain_attention_on_a_mesh(spec, rules, config):
    """The Pallas kernel (interpreted on CPU) inside its shard_map, two packed documents per
    row, against plain attention on one device. On the second mesh the sequence is split over
    devices, and inside attention the heads are split instead (tensor * sequence)."""
    batch = _batch(config, length=128)
    batch["segment_ids"] = np.repeat([[1] * 50 + [2] * 78], 8, axis=0).astype(np.int32)

    def run(spec, devices, config):
        mesh = make_mesh(spec, devices)
        params = place.place(_host_params(config), config, mesh, rules)
        step = jax.value_and_grad(partial(_loss, config=config), has_aux=True)
        out = jax.jit(with_rules(step, mesh, rules))(params, place.place_batch(batch, mesh, rules))
        return jax.device_get(out)

    expected = run("1", jax.devices()[:1], config.replace(attention="xla"))
    _close(run(spec, None, config.replace(attention="splash")), expected)


def test_splash_says_what_does_not_divide():
    """A sequence split over 4 devices becomes a heads split inside attention: GQA's 2 kv heads
    cannot follow."""
    mesh = make_mesh("fsdp=2,sequence=4")
    config = GQA.replace(attention="splash")
    params = place.place(_host_params(GQA), config, mesh, "fsdp")
    batch = place.place_batch(_batch(GQA, length=128), mesh, "fsdp")
    step = jax.jit(with_rules(partial(_loss, config=config), mesh, "fsdp"))
    with pytest.raises(
        ValueError, match=r"key/value heads \(2\) does not divide over mesh axes sequence=4"
    ):
        step(params, batch)


def test_decode_with_a_sharded_cache_matches_one_device():
    """One decode token per row against a filled cache of ragged lengths, under `infer_tp` on
    data=2,tensor=2 (batch over data, kv heads over tensor)."""
    rng = np.random.default_rng(1)
    shape = KVCache.abstract(GQA, 4, 32).k.shape
    filled = KVCache(
        rng.normal(size=shape).astype(np.float32),
        rng.normal(size=shape).astype(np.float32),
        np.array([3, 17, 0, 30], np.int32),
    )
    tokens = _batch(GQA, 4, 1)["tokens"]

    def run(spec, devices):
        mesh = make_mesh(spec, devices)
        params = place.place(_host_params(GQA), GQA, mesh, "infer_tp")
        cache = place.place_cache(filled, mesh, "infer_tp")
        step = jax.jit(with_rules(partial(llama_model.forward, config=GQA), mesh, "infer_tp"))
        logits, cache = step(params, jnp.asarray(tokens), cache=cache)
        return cache.k.sharding.spec, jax.device_get((logits, cache))

    _, expected = run("1", jax.devices()[:1])
    spec, actual = run("data=2,tensor=2", jax.devices()[:4])
    assert spec == jax.sharding.PartitionSpec(None, "data", None, "tensor")
    _close(actual, expected)
    np.testing.assert_array_equal(actual[1].lengths, filled.lengths + 1)


def test_paged_cache_splits_heads_and_rows_like_the_contiguous_cache():
    """`cache_shardings` of a `PagedKVCache` (what `sharding.aot --kv paged` compiles): the pool's
    kv heads over tensor, its blocks whole; block tables and lengths over data by row."""
    mesh = make_mesh("data=2,tensor=2", jax.devices()[:4])
    k, v = jax.eval_shape(lambda: PagedKVCache.pool_zeros(GQA, 64, 16))
    rows = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((4, 16), (4,))]
    shardings = place.cache_shardings(PagedKVCache(k, v, *rows), mesh, "infer_tp")
    assert isinstance(shardings, PagedKVCache)
    P = jax.sharding.PartitionSpec
    assert shardings.k.spec == shardings.v.spec == P(None, "tensor")  # heads-first per layer
    assert shardings.block_tables.spec == shardings.lengths.spec == P("data")


def _is_names(x):
    return isinstance(x, tuple) and all(isinstance(n, str) for n in x)
