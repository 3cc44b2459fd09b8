"""Distillation: the KL objective online and offline, the top-K dump, and teacher generations
turned into SFT data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import post
from llama_jax.config import preset
from llama_jax.model import forward, init_params
from llama_jax.tokenizer import ByteTokenizer
from sharding.distributed import global_batch
from sharding.mesh import make_mesh
from train.data import DataConfig, tokenize_document
from train.distill import (
    DistillConfig,
    DistillError,
    TopKDump,
    check_teacher,
    distill_objective,
    dump_teacher_topk,
    local_rows,
    teacher_topk,
    topk_manifest,
)
from train.generations import GenerationsError, to_sft
from train.optim import OptimConfig, make_optimizer
from train.step import Policy, build_step, init_train_state

TEACHER = preset("tiny", compute_dtype="float32")  # dim 64, 2 layers, vocab 512
STUDENT = TEACHER.replace(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
VOCAB = TEACHER.vocab_size
RNG = jax.random.key(0)


def make_batch(seed: int, rows: int = 2, length: int = 16) -> dict[str, jax.Array]:
    """Random tokens, two packed documents per row, the last 3 positions padding, a mask that
    leaves some real targets uncounted."""
    r = np.random.default_rng(seed)
    tokens = r.integers(0, VOCAB, (rows, length + 1), dtype=np.int32)
    split = length // 2
    segments = np.where(np.arange(length) < split, 1, 2)
    segments[-3:] = 0
    positions = np.where(segments == 1, np.arange(length), np.arange(length) - split)
    mask = (segments != 0) & (r.random((rows, length)) < 0.8)
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.asarray(np.broadcast_to(positions, (rows, length)), jnp.int32),
        "segment_ids": jnp.asarray(np.broadcast_to(segments, (rows, length)), jnp.int32),
        "loss_mask": jnp.asarray(mask, jnp.float32),
    }


def sharp_teacher(seed: int):
    """A random teacher with its head scaled up: peaked distributions that depend strongly on
    the context, far from a fresh student's near-uniform ones."""
    params = init_params(TEACHER, seed)
    return {**params, "output": params["output"] * 8.0}


jitted_topk = jax.jit(teacher_topk, static_argnums=(1, 3, 4, 5))


def with_topk(batch, params, config, temperature, k=VOCAB, chunks=1):
    ids, logps = jitted_topk(params, config, batch, k, temperature, chunks)
    return {**batch, "teacher_ids": ids, "teacher_logps": logps}


def loss_and_grad(objective, params, frozen, batch):
    def loss(p):
        parts = objective(p, frozen, batch, RNG)
        return parts.loss_sum, parts

    (_, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return parts, grads


def max_abs(tree) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


# --- the objective ---------------------------------------------------------------------------


def test_student_equal_to_teacher_has_zero_loss_and_gradient():
    params = init_params(TEACHER, 0)
    batch = make_batch(0)
    cfg = DistillConfig(temperature=2.0)
    online = distill_objective(Policy(TEACHER), TEACHER, cfg, loss_chunks=2)
    parts, grads = loss_and_grad(online, params, {"teacher": params}, batch)
    assert float(parts.count) == float(batch["loss_mask"].sum()) > 0
    assert abs(float(parts.loss_sum)) <= 1e-6 and max_abs(grads) <= 1e-6

    offline = distill_objective(Policy(TEACHER), None, cfg, loss_chunks=2)
    parts, grads = loss_and_grad(offline, params, {}, with_topk(batch, params, TEACHER, 2.0))
    assert abs(float(parts.loss_sum)) <= 1e-6 and max_abs(grads) <= 1e-6


def test_offline_topk_of_the_whole_vocabulary_equals_the_online_teacher():
    student, teacher = init_params(STUDENT, 1), sharp_teacher(2)
    batch = make_batch(1, length=32)
    cfg = DistillConfig(temperature=2.0, alpha=0.7)
    online = distill_objective(Policy(STUDENT), TEACHER, cfg)
    offline = distill_objective(Policy(STUDENT), None, cfg, loss_chunks=4)
    on, on_grads = loss_and_grad(online, student, {"teacher": teacher}, batch)
    off, off_grads = loss_and_grad(
        offline, student, {}, with_topk(batch, teacher, TEACHER, 2.0, chunks=8)
    )
    n = float(on.count)
    assert float(on.loss_sum) / n > 0.1
    assert abs(float(on.loss_sum - off.loss_sum)) / n <= 1e-5
    for key in ("kl", "ce"):
        assert abs(float(on.means[key] - off.means[key])) / n <= 1e-5
    diff = jax.tree.map(lambda a, b: (a - b) / n, on_grads, off_grads)
    assert max_abs(diff) <= 1e-5 and max_abs(on_grads) / n > 1e-3


def test_a_train_step_on_dumped_topk_matches_the_online_step():
    teacher = sharp_teacher(8)
    batch = make_batch(3, rows=4)
    cfg = DistillConfig(temperature=1.5, alpha=0.8)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), 10)
    state = init_train_state(STUDENT, optimizer, seed=1)
    online = build_step(distill_objective(Policy(STUDENT), TEACHER, cfg), optimizer)
    offline = build_step(distill_objective(Policy(STUDENT), None, cfg), optimizer, grad_accum=2)
    _, on = jax.jit(online)(state, batch, {"teacher": teacher})
    _, off = jax.jit(offline)(state, with_topk(batch, teacher, TEACHER, 1.5), {})
    assert float(on["kl"]) > 0.1
    for key in ("loss", "kl", "ce", "grad_norm", "loss_tokens", "tokens"):
        np.testing.assert_allclose(float(off[key]), float(on[key]), rtol=1e-5, err_msg=key)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_forward_kl_at_temperature_mixed_with_cross_entropy():
    student, teacher = init_params(STUDENT, 3), sharp_teacher(4)
    batch = make_batch(2)
    t, alpha = 2.0, 0.5
    objective = distill_objective(
        Policy(STUDENT), TEACHER, DistillConfig(temperature=t, alpha=alpha), loss_chunks=4
    )
    parts = objective(student, {"teacher": teacher}, batch, RNG)

    def logits(params, config):
        out, _ = forward(
            params, batch["tokens"], batch["positions"], batch["segment_ids"], config=config
        )
        return np.asarray(out, np.float64)

    zs, zt = logits(student, STUDENT), logits(teacher, TEACHER)
    log_p, log_q = _log_softmax(zt / t), _log_softmax(zs / t)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    targets = np.asarray(batch["targets"])
    ce = -np.take_along_axis(_log_softmax(zs), targets[..., None], -1)[..., 0]
    m = np.asarray(batch["loss_mask"], np.float64)
    want = alpha * t**2 * (kl * m).sum() + (1 - alpha) * (ce * m).sum()
    np.testing.assert_allclose(float(parts.loss_sum), want, rtol=1e-5)
    np.testing.assert_allclose(float(parts.means["kl"]), (kl * m).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(parts.means["ce"]), (ce * m).sum(), rtol=1e-5)
    assert float(parts.count) == m.sum()
    assert float(parts.totals["tokens"]) == float((batch["segment_ids"] != 0).sum())


def test_training_lowers_the_students_kl_to_the_teacher():
    frozen = {"teacher": sharp_teacher(5)}
    objective = distill_objective(Policy(STUDENT), TEACHER, DistillConfig(), loss_chunks=2)
    steps = 60
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=5), steps)
    step = jax.jit(build_step(objective, optimizer))
    held_out = [make_batch(1000 + i, rows=8, length=32) for i in range(2)]

    @jax.jit
    def mean_kl(params):
        parts = [objective(params, frozen, b, RNG) for b in held_out]
        return sum(p.means["kl"] for p in parts) / sum(p.count for p in parts)

    state = init_train_state(STUDENT, optimizer, seed=0)
    before = float(mean_kl(state.params))
    for i in range(steps):
        state, metrics = step(state, make_batch(i, rows=8, length=32), frozen)
    after = float(mean_kl(state.params))
    assert np.isfinite(float(metrics["loss"])) and before > 0.5
    assert after < 0.7 * before, (before, after)


def test_a_teacher_with_another_vocabulary_is_refused():
    check_teacher(STUDENT, TEACHER, "ckpt/teacher")
    with pytest.raises(DistillError) as e:
        check_teacher(STUDENT, TEACHER.replace(vocab_size=256), "ckpt/teacher")
    assert str(e.value) == (
        "--teacher ckpt/teacher: vocab_size 256 differs from the student's 512; "
        "distillation needs the same tokenizer"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.0}, "distill temperature must be > 0, got 0.0"),
        ({"alpha": 1.5}, r"distill alpha must be in \[0, 1\], got 1.5"),
    ],
)
def test_distill_config_is_validated(fields, message):
    with pytest.raises(DistillError, match=message):
        DistillConfig(**fields)


# --- the top-K dump --------------------------------------------------------------------------

DATA = DataConfig(paths=("docs.jsonl",), seq_len=16, batch=2, tokenizer="bytes")


def manifest(**changes):
    fields = {"data": DATA, "seed": 0, "processes": 1, "temperature": 2.0, "vocab_size": VOCAB}
    return topk_manifest(**{**fields, **changes})


def test_topk_dump_round_trip_and_errors(tmp_path):
    ids = np.arange(2 * 16 * 4, dtype=np.int32).reshape(2, 16, 4)
    logps = -np.linspace(0.1, 5, ids.size, dtype=np.float32).reshape(ids.shape)
    dump = TopKDump.create(tmp_path / "dump", {**manifest(), "k": 4, "teacher": "ckpt/t"})
    dump.write(1, 0, ids, logps)
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == [
        "manifest.json",
        "step_00000001.p00000.npz",
    ]

    read = TopKDump.open(tmp_path / "dump", manifest()).read(1, 0)
    assert read["teacher_ids"].dtype == np.int32 and read["teacher_logps"].dtype == np.float32
    np.testing.assert_array_equal(read["teacher_ids"], ids)
    np.testing.assert_array_equal(read["teacher_logps"], logps)

    other = manifest(data=DataConfig(paths=("docs.jsonl",), seq_len=32, batch=2))
    with pytest.raises(DistillError, match=r"manifest.json: seq_len is 16 but this run's is 32;"):
        TopKDump.open(tmp_path / "dump", other)
    with pytest.raises(DistillError, match=r"manifest.json: temperature is 2.0 but .* 1.0;"):
        TopKDump.open(tmp_path / "dump", manifest(temperature=1.0))
    with pytest.raises(DistillError, match=r"step_00000002.p00000.npz: missing;"):
        dump.read(2, 0)
    with pytest.raises(DistillError, match=r"no manifest.json"):
        TopKDump.open(tmp_path / "none", manifest())


def test_local_rows_assembles_a_sharded_array():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "seq"))
    x = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8, 6, 3)
    for spec in (PartitionSpec("data", "seq"), PartitionSpec(None, "seq"), PartitionSpec()):
        placed = jax.device_put(x, NamedSharding(mesh, spec))
        np.testing.assert_array_equal(local_rows(placed), x)


def test_dump_teacher_topk_writes_each_step_once(tmp_path):
    teacher = init_params(TEACHER, 6)
    batches = [(1, make_batch(10)), (2, make_batch(11))]
    dump = TopKDump.create(tmp_path, {**manifest(), "k": 8, "teacher": "ckpt/t"})
    assert dump_teacher_topk(teacher, TEACHER, batches, dump, 8, 2.0, 0, chunks=2) == 2
    assert dump_teacher_topk(teacher, TEACHER, batches, dump, 8, 2.0, 0) == 0  # resumed: none
    read = TopKDump.open(tmp_path, manifest()).read(2, 0)
    ids, logps = teacher_topk(teacher, TEACHER, batches[1][1], 8, 2.0)
    np.testing.assert_array_equal(read["teacher_ids"], np.asarray(ids))
    np.testing.assert_allclose(read["teacher_logps"], np.asarray(logps), rtol=1e-6)
    assert np.all(np.diff(read["teacher_logps"], axis=-1) <= 0)  # most likely first
    with pytest.raises(
        DistillError, match=r"manifest has k, temperature = \(8, 2.0\), not \(4, 2.0\)"
    ):
        dump_teacher_topk(teacher, TEACHER, batches, dump, 4, 2.0, 0)
    with pytest.raises(DistillError, match=r"--dump-teacher-topk 513: K must be in 1..512"):
        teacher_topk(teacher, TEACHER, batches[0][1], 513, 1.0)


def test_dump_of_a_batch_sharded_over_a_mesh_holds_its_rows(tmp_path):
    teacher = init_params(TEACHER, 7)
    mesh = make_mesh("fsdp=-1", jax.devices()[:4])
    local = {k: np.asarray(v) for k, v in make_batch(12, rows=8).items()}
    placed = global_batch(local, 8, mesh, "fsdp")
    dump = TopKDump.create(tmp_path, {**manifest(), "k": 3, "teacher": "ckpt/t"})
    dump_teacher_topk(teacher, TEACHER, [(5, placed)], dump, 3, 2.0, 0, mesh=mesh, total=1)
    ids, logps = teacher_topk(teacher, TEACHER, local, 3, 2.0)
    read = dump.read(5, 0)
    np.testing.assert_array_equal(read["teacher_ids"], np.asarray(ids))
    np.testing.assert_allclose(read["teacher_logps"], np.asarray(logps), rtol=1e-5, atol=1e-6)


# --- sequence-level distillation -------------------------------------------------------------

PROMPTS = [
    {"prompt": "Say hello", "max_new_tokens": 8},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
    {"prompt": "Count to ten"},
]
RESULTS = [
    {"prompt_ids": [1], "generated_ids": [2], "text": "hello", "finish_reason": "stop"},
    {"prompt_ids": [1], "generated_ids": [3], "text": "4", "finish_reason": "stop"},
    {"prompt_ids": [1], "generated_ids": [4], "text": "1, 2, 3", "finish_reason": "length"},
]


def write_jsonl(path, rows, blank_after: int = -1):
    lines = [json.dumps(r) + ("\n\n" if i == blank_after else "\n") for i, r in enumerate(rows)]
    path.write_text("".join(lines))
    return path


def test_to_sft_writes_chats_that_sft_training_reads(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, blank_after=0)
    gens = write_jsonl(tmp_path / "out.jsonl", RESULTS)
    out = tmp_path / "sft.jsonl"
    argv = ["to-sft", "--prompts", str(prompts), "--generations", str(gens), "--out", str(out)]
    assert post.main(argv) == 0
    assert capsys.readouterr().err == (
        f"wrote 2 chats to {out}; skipped 1 that ended by length (--keep-truncated keeps them)\n"
    )
    chats = [json.loads(line) for line in out.read_text().splitlines()]
    assert chats == [
        {
            "messages": [
                {"role": "user", "content": "Say hello"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"messages": [*PROMPTS[1]["messages"], {"role": "assistant", "content": "4"}]},
    ]
    tokenizer = ByteTokenizer()
    example = tokenize_document(chats[0], tokenizer, sft=True)
    counted = example["targets"][example["loss_mask"] == 1]
    assert tokenizer.decode(counted) == "hello<|eot_id|>"

    assert to_sft(prompts, gens, out, keep_truncated=True).written == 3
    assert json.loads(out.read_text().splitlines()[2])["messages"][1]["content"] == "1, 2, 3"


def test_to_sft_writes_tools_into_the_prompt_as_inference_did(tmp_path):
    tool = {"type": "function", "function": {"name": "add", "parameters": {}}}
    row = {"messages": [{"role": "user", "content": "1+1?"}], "tools": [tool]}
    prompts = write_jsonl(tmp_path / "p.jsonl", [row])
    gens = write_jsonl(tmp_path / "g.jsonl", RESULTS[:1])
    out = tmp_path / "sft.jsonl"
    argv = ["to-sft", "--prompts", str(prompts), "--generations", str(gens), "--out", str(out)]
    assert post.main(argv) == 0
    messages = json.loads(out.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"].startswith("Environment: ipython")
    assert '"name": "add"' in messages[1]["content"] and messages[1]["content"].endswith("1+1?")
    with pytest.raises(GenerationsError, match=r"p.jsonl:1: tools given"):
        to_sft(prompts, gens, out)


def test_to_sft_errors_name_the_line(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS, blank_after=0)
    short = write_jsonl(tmp_path / "g.jsonl", RESULTS[:2])
    out = tmp_path / "sft.jsonl"
    argv = ["to-sft", "--prompts", str(prompts), "--generations", str(short), "--out", str(out)]
    assert post.main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {prompts}:4: prompt without a result: 3 prompts in {prompts}, 2 results in "
        f"{short} (matched by order)\n"
    )
    assert not out.exists()

    long = write_jsonl(tmp_path / "g.jsonl", [*RESULTS, RESULTS[0]])
    with pytest.raises(GenerationsError, match=r"g.jsonl:4: result without a prompt"):
        to_sft(prompts, long, out)
    untokenized = write_jsonl(
        tmp_path / "g.jsonl", [RESULTS[0], {**RESULTS[1], "text": None}, RESULTS[2]]
    )
    with pytest.raises(GenerationsError, match=r"g.jsonl:2: result has no text"):
        to_sft(prompts, untokenized, out)
    ids = write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [1, 2]}])
    with pytest.raises(GenerationsError, match=r"p.jsonl:1: prompt_ids has no text"):
        to_sft(ids, write_jsonl(tmp_path / "g.jsonl", RESULTS[:1]), out)
