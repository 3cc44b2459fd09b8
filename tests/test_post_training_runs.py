"""Post-training runs end to end through `python -m llama_jax.train`'s config and flags: DPO with
each reference (a frozen copy, a precomputed first pass, the LoRA base) and distillation from an
online teacher, from an offline top-K dump of it (the same losses when K = vocab), and refused
when the vocabularies differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic import arithmetic_jsonl, rule_pairs

from llama_jax.train import main as train_main
from train.config import load_config
from train.loop import run


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def _config(path: Path, **settings) -> Path:
    """A tiny float32 run as a YAML file (what `--config` reads)."""
    base = {
        "model": "tiny",
        "compute_dtype": "float32",
        "remat": "none",
        "data": {"seq_len": 64, "batch": 8, "tokenizer": "bytes"},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "steps": 3,
        "mesh": "fsdp=-1",
        "log_every": 1,
        "peak_tflops": 1.0,
    }
    for key, value in settings.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(base))
    return path


def _pairs(path: Path, n: int = 256) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in rule_pairs(n, 0)))
    return path


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> Path:
    return arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arithmetic.jsonl", 1000)


def test_dpo_with_a_frozen_copy_a_precomputed_pass_and_the_lora_base(tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    settings = {"objective": "dpo", "dpo": {"beta": 0.5}, "data": {"paths": [str(pairs)]}}
    config = _config(tmp_path / "dpo.yaml", **settings)
    runs = {
        "frozen": [],
        "precomputed": ["--precompute-reference"],
        "lora": ["--lora-rank", "4"],
    }
    losses = {}
    for name, flags in runs.items():
        run_dir = tmp_path / name
        assert train_main(["--config", str(config), "--checkpoint-dir", str(run_dir), *flags]) == 0
        rows = _metrics(run_dir)
        losses[name] = [r["loss"] for r in rows]
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
        assert rows[0]["pairs"] >= 8 and "rewards/accuracies" in rows[-1]
        assert rows[-1]["rewards/margins"] > 0  # the preferred completions gain
    for name in runs:
        assert losses[name][0] == pytest.approx(np.log(2), abs=1e-6)
    # the pass scores with the starting model, which the frozen copy is: the same run
    np.testing.assert_allclose(losses["precomputed"], losses["frozen"], rtol=1e-5)
    assert (tmp_path / "precomputed" / "reference-logps.p0.jsonl").is_file()


def test_distillation_online_and_from_a_dump_of_the_whole_vocabulary_agree(arithmetic, tmp_path):
    teacher = tmp_path / "teacher"
    data = {"data": {"paths": [str(arithmetic)]}}
    teacher_cfg = _config(tmp_path / "teacher.yaml", **data, steps=4, save_every=4)
    assert train_main(["--config", str(teacher_cfg), "--checkpoint-dir", str(teacher)]) == 0

    student = {"model_overrides": {"n_layers": 1}, "objective": "distill", **data}
    config = _config(tmp_path / "student.yaml", **student, distill={"temperature": 2.0})
    online, offline, dump = tmp_path / "online", tmp_path / "offline", tmp_path / "topk"
    common = ["--config", str(config), "--distill-alpha", "0.5"]
    assert train_main([*common, "--teacher", str(teacher), "--checkpoint-dir", str(online)]) == 0
    dump_flags = ["--teacher", str(teacher), "--teacher-topk", str(dump)]
    assert train_main([*common, *dump_flags, "--dump-teacher-topk", "512"]) == 0
    assert sorted(p.name for p in dump.iterdir())[0] == "manifest.json"
    flags = ["--teacher-topk", str(dump), "--checkpoint-dir", str(offline)]
    assert train_main([*common, *flags]) == 0

    a, b = _metrics(online), _metrics(offline)
    for key in ("loss", "kl", "ce", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5)
    assert a[0]["kl"] > 1e-3  # the student is not the teacher


def test_a_teacher_with_another_vocabulary_is_one_line(arithmetic, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    cfg = load_config(
        str(_config(tmp_path / "t.yaml", data={"paths": [str(arithmetic)]}, steps=1)),
        {"checkpoint_dir": str(teacher)},
    )
    run(cfg)
    capsys.readouterr()
    student = _config(
        tmp_path / "s.yaml",
        data={"paths": [str(arithmetic)]},
        objective="distill",
        model_overrides={"vocab_size": 640},
    )
    assert train_main(["--config", str(student), "--teacher", str(teacher)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --teacher {teacher}: vocab_size 512 differs from the student's 640; "
        "distillation needs the same tokenizer"
    ]
