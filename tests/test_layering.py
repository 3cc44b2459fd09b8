"""The packages depend one way: `llama_jax` core <- `sharding` <- `train`, `infer` <- CLI shims.

Checked in fresh interpreters, since this test process has imported everything already.
"""

import json
import subprocess
import sys

import pytest

# The command-line shims and the demo sit above every package; the AOT tool compiles train's
# step, so it sits above `train`.
CORE = [
    "llama_jax",
    "llama_jax.checkpoint.load",
    "llama_jax.checkpoint.export",
    "llama_jax.chat",
    "llama_jax.eval",  # a CLI shim that imports its `infer` command only when run
]
SHARDING = ["sharding.mesh", "sharding.rules", "sharding.place", "sharding.distributed"]


def loaded_packages(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize("module", CORE)
def test_core_loads_no_package_above_it(module):
    assert loaded_packages(module) & {"train", "infer", "sharding"} == set()


@pytest.mark.parametrize("module", SHARDING)
def test_sharding_loads_neither_train_nor_infer(module):
    assert loaded_packages(module) & {"train", "infer"} == set()


def test_train_and_infer_do_not_load_each_other():
    assert "infer" not in loaded_packages("train.loop")
    assert "train" not in loaded_packages("infer.cli")


@pytest.mark.parametrize("module", ["infer.perplexity", "infer.lm_eval_backend"])
def test_evaluation_loads_neither_train_nor_torch(module):
    """torch and transformers are test oracles: evaluation runs without them (lm-eval, an
    optional dependency, does too)."""
    if module == "infer.lm_eval_backend":
        pytest.importorskip("lm_eval")
    assert loaded_packages(module) & {"train", "torch", "transformers"} == set()
