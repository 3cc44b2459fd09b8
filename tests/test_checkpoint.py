"""Checkpoint import/export against real files and independent oracles.

Oracles: the trained stories260K model with reference logits and greedy output; `transformers`
(its own `save_pretrained` files and forward); Meta model-parallel files made here with torch,
using the HF conversion script's q/k permutation, independent of our layout table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.torch import load_file

import llama_jax as lj
from llama_jax.checkpoint import placement
from llama_jax.checkpoint.errors import CheckpointError
from llama_jax.checkpoint.export import export
from llama_jax.checkpoint.load import detect_layout, load
from llama_jax.config import from_meta_params, to_meta_params
from llama_jax.convert import main as convert_main

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24))
HF_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)
META_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 4,
    "vocab_size": 256,
    "multiple_of": 32,  # Meta's formula gives 192
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "rope_scaling_factor": 8.0,
}


def _params_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


# --- fixtures: an HF model saved by transformers, and Meta shards made from it with torch --------


def _hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**HF_CONFIG, **overrides})
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # break the all-ones init so norm mapping is checked too
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    return _hf_model()


@pytest.fixture(scope="module")
def hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    return path


def _meta_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF -> Meta names, undoing HF's q/k permutation as in transformers' conversion script."""

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
        out, inp = w.shape
        return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)

    m = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
        "output.weight": hf_state["lm_head.weight"],
    }
    for i in range(HF_CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        m |= {
            f"layers.{i}.attention.wq.weight": unpermute(
                hf_state[p + "self_attn.q_proj.weight"], 8
            ),
            f"layers.{i}.attention.wk.weight": unpermute(
                hf_state[p + "self_attn.k_proj.weight"], 4
            ),
            f"layers.{i}.attention.wv.weight": hf_state[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf_state[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf_state[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf_state[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf_state[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf_state[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf_state[p + "post_attention_layernorm.weight"],
        }
    return m


def _split_dim(name: str, embedding_dim: int) -> int | None:
    if name.startswith("tok_embeddings"):
        return embedding_dim
    if any(k in name for k in ("wq", "wk", "wv", "w1", "w3", "output")):
        return 0
    if any(k in name for k in ("wo", "w2")):
        return 1
    return None


def write_meta(path: Path, state: dict[str, torch.Tensor], mp: int, embedding_dim: int = 0):
    """Meta's layout: one `consolidated.NN.pth` per rank, column-parallel weights split on dim 0,
    row-parallel on dim 1, norms replicated."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(META_PARAMS))
    for rank in range(mp):
        shard = {}
        for name, w in state.items():
            dim = _split_dim(name, embedding_dim)
            shard[name] = w.clone() if dim is None else torch.chunk(w, mp, dim)[rank].clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


@pytest.fixture(scope="module")
def meta_state(hf_model) -> dict[str, torch.Tensor]:
    return _meta_state({k: v.detach() for k, v in hf_model.state_dict().items()})


@pytest.fixture(scope="module")
def meta_dirs(meta_state, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("meta")
    return {mp: write_meta(root / f"mp{mp}", meta_state, mp) for mp in (1, 2, 4)}


# --- stories260K: a real trained model ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_stories260k_reproduces_reference(shared_assets, layout):
    root = shared_assets / "stories260K"
    expected_logits = np.load(root / "expected/logits_first32.npy")
    greedy = json.loads((root / "expected/greedy_from_bos.json").read_text())
    tokens = np.asarray(greedy["tokens"])
    model = load(root / layout)
    assert model.config.dim == 64 and model.config.n_kv_heads == 4
    logits = model.logits(tokens[None, :-1])[0]
    np.testing.assert_allclose(logits[:32], expected_logits, atol=1e-4, rtol=0)
    # Greedy decoding from BOS picks argmax given the prefix so far; every position's argmax
    # equalling the next reference token is exactly "greedy output identical".
    assert len(tokens) == 257
    np.testing.assert_array_equal(logits.argmax(-1), tokens[1:])


# --- Hugging Face -----------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_sharded_safetensors_match_transformers(hf_dir, hf_logits):
    model = load(hf_dir)
    assert model.config.rope_scaling is not None and model.config.param_dtype == "float32"
    np.testing.assert_allclose(model.logits(TOKENS), hf_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_is_bit_exact_and_loads_in_transformers(
    hf_model, hf_dir, hf_logits, tmp_path, dtype
):
    src = hf_dir
    if dtype == "bfloat16":
        src = tmp_path / "bf16"
        _hf_model().to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    model = load(src)
    assert model.config.param_dtype == dtype
    out = export(model, tmp_path / "out", "hf", max_shard_bytes=120_000)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    originals, exported = {}, {}
    for f in src.glob("*.safetensors"):
        originals |= load_file(f)
    for f in out.glob("*.safetensors"):
        exported |= load_file(f)
    assert originals.keys() == exported.keys()
    for name, t in originals.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    if dtype == "float32":
        reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
        with torch.no_grad():
            logits = reloaded.eval()(torch.tensor(TOKENS)).logits.numpy()
        np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(model.logits(TOKENS), hf_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_tied_model_round_trips_without_lm_head(tmp_path):
    hf = _hf_model(seed=1, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    model = load(tmp_path / "src")
    assert model.config.tie_embeddings and "output" not in model.params
    out = export(model, tmp_path / "tied", "hf")
    exported = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in exported
    assert torch.equal(exported["model.embed_tokens.weight"], hf.model.embed_tokens.weight)
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(TOKENS)).logits.numpy()
        np.testing.assert_array_equal(back(torch.tensor(TOKENS)).logits.numpy(), ref)
    np.testing.assert_allclose(model.logits(TOKENS), ref, atol=1e-4, rtol=0)


# --- Meta -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_meta_model_parallel_shards_load_identically(meta_dirs, hf_dir, hf_logits):
    reference = load(hf_dir).params
    for mp, path in meta_dirs.items():
        model = load(path)
        assert _params_equal(model.params, reference), f"MP={mp}"
    np.testing.assert_allclose(model.logits(TOKENS), hf_logits, atol=1e-4, rtol=0)


def test_llama2_embedding_split_on_dim_1(meta_state, meta_dirs, tmp_path):
    path = write_meta(tmp_path / "llama2", meta_state, mp=2, embedding_dim=1)
    assert _params_equal(load(path).params, load(meta_dirs[1]).params)


@pytest.mark.slow
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_meta_round_trip_is_bit_exact(meta_dirs, tmp_path, mp):
    out = export(load(meta_dirs[mp]), tmp_path / "out", "meta", mp=mp)
    assert from_meta_params(out / "params.json") == from_meta_params(meta_dirs[mp] / "params.json")
    for rank in range(mp):
        name = f"consolidated.{rank:02d}.pth"
        a = torch.load(meta_dirs[mp] / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].dtype == a[key].dtype and torch.equal(a[key], b[key]), key


# The keys of Meta's published params.json files (Llama 3.2 1B/3B add `rope_scaling_factor`).
META_FILE_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier",
                  "multiple_of", "norm_eps", "rope_theta", "use_scaled_rope"}  # fmt: skip


def _tied_model(seed: int = 0) -> lj.Model:
    """tiny-tied with weights of std 0.2 and norms in [0.5, 1.5], so its logits spread widely
    and a mapping error in any tensor, norms included, shows."""
    model = lj.init(lj.preset("tiny-tied"))
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        is_norm = "norm" in jax.tree_util.keystr(path)
        values = rng.uniform(0.5, 1.5, x.shape) if is_norm else rng.normal(0, 0.2, x.shape)
        return jax.numpy.asarray(values, x.dtype)

    model.params = jax.tree_util.tree_map_with_path(redraw, model.params)
    return model


@pytest.fixture(scope="module")
def llama_models_transformer(tmp_path_factory):
    """Meta's reference `Transformer` (llama_models), its fairscale layers on one model-parallel
    rank of a one-process gloo group, as `Llama.build` sets them up off-GPU."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as model_parallel
    from llama_models.llama3.model import Transformer

    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    model_parallel.initialize_model_parallel(1)
    yield Transformer
    model_parallel.destroy_model_parallel()
    dist.destroy_process_group()


def _llama_models_logits(transformer: type, root: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of Meta's reference model loaded from `root` as `Llama.build` loads it:
    `ModelArgs(max_seq_len=..., max_batch_size=..., **params.json)`, `load_state_dict` strict."""
    from llama_models.llama3.args import ModelArgs

    params = json.loads((root / "params.json").read_text())
    args = ModelArgs(max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0], **params)
    model = transformer(args)
    state = torch.load(root / "consolidated.00.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model(torch.tensor(tokens), 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("route", ["export", "convert from hf"])
def test_tied_model_meta_export_loads_strictly_in_llama_models(
    llama_models_transformer, tmp_path, route
):
    model = _tied_model()
    meta = tmp_path / "meta"
    if route == "export":
        export(model, meta, "meta")
    else:
        hf = export(model, tmp_path / "hf", "hf")
        assert convert_main([str(hf), str(meta), "--to", "meta", "--no-progress"]) == 0
    assert set(json.loads((meta / "params.json").read_text())) <= META_FILE_KEYS
    reference = _llama_models_logits(llama_models_transformer, meta, TOKENS)
    ours = model.logits(TOKENS)
    assert ours.std() > 1  # logits that spread, so the tolerance below is a real check
    np.testing.assert_allclose(reference, ours, atol=1e-4, rtol=0)


def test_tied_model_through_meta_keeps_its_logits_exactly(tmp_path):
    """A tied model's Meta directory imports untied (Meta's `output.weight` is its own tensor),
    head equal to the embeddings; HF -> Meta -> HF ends untied with the same logits."""
    model = _tied_model()
    want = model.logits(TOKENS)
    back = load(export(model, tmp_path / "meta", "meta", mp=2))
    assert not back.config.tie_embeddings
    np.testing.assert_array_equal(back.params["output"], model.params["tok_embeddings"].T)
    np.testing.assert_array_equal(back.logits(TOKENS), want)
    hf, meta, hf_again = (str(tmp_path / d) for d in ("hf", "meta_from_hf", "hf_again"))
    export(model, hf, "hf")
    assert convert_main([hf, meta, "--to", "meta", "--mp", "2", "--no-progress"]) == 0
    assert convert_main([meta, hf_again, "--to", "hf", "--no-progress"]) == 0
    assert "lm_head.weight" in load_file(Path(hf_again) / "model.safetensors")
    np.testing.assert_array_equal(load(hf_again).logits(TOKENS), want)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("tiny-tied", set()), ("llama3-8b", set()), ("llama3.1-8b", set()),
     ("llama3.2-1b", {"rope_scaling_factor"})],  # Meta's code hard-codes 8, 3.2 ships 32
)  # fmt: skip
def test_meta_params_json_holds_only_keys_of_meta_files(name, extra):
    assert set(to_meta_params(lj.preset(name))) <= META_FILE_KEYS | extra


def test_meta_import_takes_the_context_length_of_its_llama3_generation(meta_dirs, tmp_path):
    """params.json holds no context length: scaled RoPE is Llama 3.1+ (131072, as Meta's own
    config.json says), plain RoPE Llama 3 (8192); Meta -> HF writes it."""
    plain = Path(shutil.copytree(meta_dirs[1], tmp_path / "plain"))
    _edit_json(plain / "params.json", use_scaled_rope=False)
    cases = {"llama3.1-8b": meta_dirs[1], "llama3-8b": plain}
    for generation, src in cases.items():
        want = lj.preset(generation).max_seq_len
        assert load(src).config.max_seq_len == want
        dst = tmp_path / generation
        assert convert_main([str(src), str(dst), "--to", "hf", "--no-progress"]) == 0
        assert json.loads((dst / "config.json").read_text())["max_position_embeddings"] == want


def test_hf_repo_with_only_original_meta_files_and_its_tokenizer(
    meta_dirs, shared_assets, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(meta_dirs[1], repo / "original")
    (repo / "original/tokenizer.model").symlink_to(shared_assets / "llama3/tokenizer.model")
    (repo / "config.json").write_text("{}")  # an HF repo whose weights are only Meta's
    assert detect_layout(repo) == ("meta", repo / "original")
    model = load(repo)
    assert model.tokenizer is not None and model.tokenizer.bos_id == 128000
    out = export(model, tmp_path / "hf", "hf")
    assert (out / "original/tokenizer.model").read_bytes() == (
        shared_assets / "llama3/tokenizer.model"
    ).read_bytes()
    assert load(out).tokenizer.eos_id == 128001
    assert (export(model, tmp_path / "meta", "meta") / "tokenizer.model").is_file()


# --- Orbax, CLI, mesh ---------------------------------------------------------------------------


def test_orbax_export_loads_back(hf_dir, tmp_path):
    model = load(hf_dir)
    export(model, tmp_path / "orbax", "orbax")
    back = load(tmp_path / "orbax")
    assert back.config == model.config
    assert _params_equal(back.params, model.params)
    as_bf16 = load(tmp_path / "orbax", dtype="bf16")
    assert as_bf16.config.param_dtype == "bfloat16"
    assert as_bf16.params["norm"].dtype == jax.numpy.bfloat16


def test_convert_cli_streams_hf_to_meta_bf16_and_to_orbax(hf_dir, tmp_path, capsys):
    assert convert_main([str(hf_dir), str(tmp_path / "m"), "--to", "meta", "--dtype", "bf16",
                         "--mp", "2", "--no-progress"]) == 0  # fmt: skip
    want = load(hf_dir, dtype="bfloat16")
    got = load(tmp_path / "m")
    assert got.config.param_dtype == "bfloat16" and _params_equal(got.params, want.params)
    assert convert_main([str(tmp_path / "m"), str(tmp_path / "o"), "--to", "orbax"]) == 0
    assert _params_equal(load(tmp_path / "o").params, want.params)
    assert convert_main([str(hf_dir), str(tmp_path / "o"), "--to", "hf"]) == 1
    assert "not an empty directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stacking", ["into host buffers", "by donated device updates"])
def test_sharded_load_places_each_param_on_the_mesh(hf_dir, hf_logits, monkeypatch, stacking):
    if stacking == "by donated device updates":  # the accelerator path, forced on CPU
        monkeypatch.setattr(placement, "_host_memory_is_device_memory", lambda sharding: False)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
             "vocab": "tensor"}  # fmt: skip

    def shardings(names: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*(rules.get(n) for n in names)))

    model = load(hf_dir, shardings=shardings, progress=True)
    wq = model.params["layers"]["attention"]["wq"]
    assert wq.sharding == shardings(("layers", "embed", "heads", "head_dim"))
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 8)
    assert _params_equal(jax.device_get(model.params), jax.device_get(load(hf_dir).params))
    np.testing.assert_allclose(model.logits(TOKENS), hf_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_rule_presets_place_the_load(hf_dir, hf_logits):
    rules = pytest.importorskip("sharding.rules")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    for preset in ("fsdp_tp", "infer_tp"):
        model = load(hf_dir, shardings=rules.resolver(mesh, preset))
        assert model.mesh == mesh
        want = rules.param_shardings(model.config, mesh, preset)
        got = jax.tree.map(lambda x: x.sharding, model.params)
        assert jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 4), got, want))
    np.testing.assert_allclose(model.logits(TOKENS), hf_logits, atol=1e-4, rtol=0)


def test_training_run_directory_loads_its_latest_step(hf_dir, tmp_path):
    import orbax.checkpoint as ocp

    model = load(hf_dir)
    items = ("params", "model_config")
    with ocp.CheckpointManager(tmp_path / "run/checkpoints", item_names=items) as manager:
        for step, params in ((1, jax.tree.map(np.zeros_like, model.params)), (2, model.params)):
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                model_config=ocp.args.JsonSave(model.config.to_dict()),
            ))  # fmt: skip
        manager.wait_until_finished()
    back = load(tmp_path / "run", dtype="bf16")
    assert back.config == model.config.replace(param_dtype="bfloat16")
    assert _params_equal(back.params, load(hf_dir, dtype="bf16").params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a Meta .* nor a training run"):
        load(tmp_path / "empty")


# --- errors name the file and the tensor -------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _shard_of(root: Path, tensor: str) -> Path:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    return root / index["weight_map"][tensor]


def _truncate(root: Path) -> None:
    f = _shard_of(root, "model.layers.1.mlp.down_proj.weight")
    f.write_bytes(f.read_bytes()[:-10])


def _drop_shard(root: Path) -> None:
    _shard_of(root, "model.norm.weight").unlink()


HF_BREAKAGES = {
    "truncated": (_truncate, r"model-\d+-of-\d+\.safetensors: tensor .*: data ends at .*truncated"),
    "missing shard": (_drop_shard, r"model-\d+-of-\d+\.safetensors: missing shard \(holds tensor"),
    "shape": (
        lambda root: _edit_json(root / "config.json", intermediate_size=160),
        r"model-\d+-of-\d+\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight: shape "
        r"\(192, 64\) disagrees with config\.json",
    ),
    "unknown name": (
        lambda root: _edit_json(root / "config.json", num_hidden_layers=1),
        r"tensor model\.layers\.1\.\S+: unknown tensor name",
    ),
}


@pytest.mark.parametrize("breakage", list(HF_BREAKAGES))
def test_hf_errors_name_file_and_tensor(hf_dir, tmp_path, breakage):
    root = Path(shutil.copytree(hf_dir, tmp_path / "broken"))
    damage, message = HF_BREAKAGES[breakage]
    damage(root)
    with pytest.raises(CheckpointError, match=message):
        load(root)


def _meta_with(state: dict, tmp_path: Path, **changes) -> Path:
    return write_meta(tmp_path / "m", {**state, **changes}, mp=1)


def test_meta_errors_name_file_and_tensor(meta_state, meta_dirs, tmp_path):
    root = Path(shutil.copytree(meta_dirs[4], tmp_path / "mp4"))
    (root / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: missing shard"):
        load(root)
    root = Path(shutil.copytree(meta_dirs[2], tmp_path / "mp2"))
    _edit_json(root / "params.json", n_kv_heads=2)
    with pytest.raises(
        CheckpointError,
        match=r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\.weight: shape \(16, 64\) "
        r"x 2 rank\(s\) disagrees with params\.json",
    ):
        load(root)
    extra = {"layers.0.attention.bias": torch.zeros(64)}
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.attention\.bias: unknown tensor"):
        load(_meta_with(meta_state, tmp_path / "a", **extra))
    wide = {"norm.weight": meta_state["norm.weight"].double()}
    with pytest.raises(
        CheckpointError, match=r"consolidated\.00\.pth: tensor norm\.weight: dtype DoubleStorage"
    ):
        load(_meta_with(meta_state, tmp_path / "b", **wide))
    partial = {k: v for k, v in meta_state.items() if k != "layers.1.ffn_norm.weight"}
    with pytest.raises(CheckpointError, match=r"tensor layers\.1\.ffn_norm\.weight: missing"):
        load(write_meta(tmp_path / "c", partial, mp=1))
