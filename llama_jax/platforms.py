"""Which JAX platforms the command-line tools start, so they start quietly wherever they run.

With the `tpu` extra installed (libtpu: the AOT tool needs it) JAX initialises its TPU backend
on every start, and on a machine without a TPU libtpu prints `E0000 ... TPU_WORKER_HOSTNAMES`
errors before JAX falls back to the CPU. The tools therefore name the platforms that are there:
the TPU when chips are attached, else CUDA when an NVIDIA GPU and JAX's CUDA plugin are, else
the CPU. `JAX_PLATFORMS`, when set, always wins.
"""

from __future__ import annotations

import importlib.util
import os

import jax
from jax._src import hardware_utils  # JAX's own PCI scan for TPU chips and NVIDIA devices

CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def present_platforms() -> str | None:
    """A `jax_platforms` value without the TPU when none is attached; None to let JAX choose
    (a TPU is there)."""
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    if chips:
        return None
    cuda = hardware_utils.has_visible_nvidia_gpu() and any(
        importlib.util.find_spec(name) for name in CUDA_PLUGINS
    )
    return "cuda,cpu" if cuda else "cpu"


def skip_absent_tpu() -> None:
    """Set `jax_platforms` to what `present_platforms` finds, unless `JAX_PLATFORMS` is set.
    Call before anything touches a device."""
    if "JAX_PLATFORMS" in os.environ:
        return
    platforms = present_platforms()
    if platforms is not None:
        jax.config.update("jax_platforms", platforms)
