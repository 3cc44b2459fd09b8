"""The machine's physical limits: float32 matmul peak (GFLOP/s) and memory read bandwidth (GB/s).

Each is probed with both stacks (XLA and PyTorch, all cores) and the best figure is kept, so a
utilisation computed against it is never flattered by a weak probe. Matmul: square products
large enough to be compute-bound. Bandwidth: a sum over an array far larger than the caches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

MATMUL_SIZES = (1024, 2048, 3072)
BANDWIDTH_BYTES = 1 << 30


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up call (a peak is a best case)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _jax_probes(sizes: tuple[int, ...], nbytes: int, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    out = {}
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
        s = best_seconds(lambda a=a: matmul(a, a).block_until_ready(), repeats)
        out[f"matmul_gflops/jax/{n}"] = 2 * n**3 / s / 1e9
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    s = best_seconds(lambda: total(x).block_until_ready(), repeats)
    out["read_gbs/jax"] = nbytes / s / 1e9
    return out


def _torch_probes(sizes: tuple[int, ...], nbytes: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for n in sizes:
        a = torch.randn(n, n)
        s = best_seconds(lambda a=a: a @ a, repeats)
        out[f"matmul_gflops/torch/{n}"] = 2 * n**3 / s / 1e9
    x = torch.ones(nbytes // 4)
    s = best_seconds(x.sum, repeats)
    out["read_gbs/torch"] = nbytes / s / 1e9
    return out


def measure(
    sizes: tuple[int, ...] = MATMUL_SIZES, nbytes: int = BANDWIDTH_BYTES, repeats: int = 10
) -> dict[str, object]:
    """{"matmul_gflops": best, "read_gbs": best, "probes": every probe's figure, "cores": n}."""
    probes = {
        **_jax_probes(sizes, nbytes, repeats),
        **_torch_probes(sizes, nbytes, repeats),
    }
    return {
        "matmul_gflops": max(v for k, v in probes.items() if k.startswith("matmul")),
        "read_gbs": max(v for k, v in probes.items() if k.startswith("read")),
        "probes": {k: round(v, 2) for k, v in probes.items()},
        "cores": os.cpu_count(),
        "method": f"best of {repeats} calls after a warm-up, XLA and PyTorch on all cores",
    }
