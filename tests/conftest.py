"""Test session set-up: an emulated 8-device CPU mesh, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLIs under test keep no compilation cache (test_compile_cache turns one on explicitly).
os.environ["LLAMA_JAX_COMPILE_CACHE"] = "off"

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """`../shared/assets` beside the checkout (Meta's tokenizer, stories260K)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: tests that need ../shared/assets are skipped")
    return SHARED


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop each module's compiled executables when it ends. Every XLA CPU executable holds
    memory mappings of its own, and one process compiling the whole suite's shapes would pass
    the kernel's limit on mappings (vm.max_map_count, 65530 by default), crashing a later
    compile."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
