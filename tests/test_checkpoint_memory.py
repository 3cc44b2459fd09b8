"""Peak host memory of a streaming import stays near params + one tensor.

A ~380 MB fp32 HF checkpoint is written here, then loaded in a fresh subprocess; its peak RSS
(ru_maxrss) minus the RSS just before loading must be under 1.5x the largest tensor plus the
loaded params. The largest file tensor (32 MB embedding) is smaller than a stacked param
(6 x 12 MB), so building any stacked param on the host in one piece would show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from llama_jax.checkpoint import layout
from llama_jax.checkpoint.safetensors_io import PlannedTensor, write_sharded
from llama_jax.config import LlamaConfig, to_hf_config

CONFIG = LlamaConfig(
    dim=1024, n_layers=6, n_heads=8, n_kv_heads=8, ffn_dim=3072, vocab_size=8192,
    rope_theta=500000.0,
)  # fmt: skip

MEASURE = """
import json, resource, sys
import jax, jax.numpy as jnp
from llama_jax.checkpoint.load import load_params
import numpy as np
jax.device_put(np.ones((1024, 1024), np.float32)).block_until_ready()  # start the runtime
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config, params, _ = load_params(sys.argv[1], progress=False)
jax.block_until_ready(params)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": before * 1024, "peak": peak * 1024}))
"""


def _write_checkpoint(root: Path) -> tuple[int, int]:
    """(total bytes, largest tensor bytes) of a random fp32 checkpoint written to `root`."""
    rng = np.random.default_rng(0)
    planned = [
        PlannedTensor(name, shape, np.dtype(np.float32), lambda s=shape: rng.random(s, np.float32))
        for name, spec, _ in layout.tensor_names(CONFIG, "hf")
        for shape in [layout.torch_shape_full(spec, CONFIG)]
    ]
    write_sharded(root, planned, max_shard_bytes=100 << 20)
    (root / "config.json").write_text(json.dumps(to_hf_config(CONFIG)))
    return sum(t.nbytes for t in planned), max(t.nbytes for t in planned)


def test_peak_rss_is_params_plus_one_tensor(tmp_path):
    total, largest = _write_checkpoint(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["before"]
    mb = 1 << 20
    print(
        f"checkpoint {total / mb:.0f} MB, largest tensor {largest / mb:.0f} MB, "
        f"RSS before {rss['before'] / mb:.0f} MB, peak {rss['peak'] / mb:.0f} MB, "
        f"growth {grown / mb:.0f} MB = params + {(grown - total) / mb:.0f} MB "
        f"(bound params + {1.5 * largest / mb:.0f} MB)"
    )
    assert grown < 1.5 * largest + total
