"""Rotary position embeddings with Llama 3.1 frequency scaling.

Frequencies are computed in float32 with the same operation order as Meta's reference and
`transformers`, so angles at positions past 100k round identically; the rotation itself uses the
rotate-half layout (q/k features ordered [real parts..., imaginary parts...] per head), which is
how Hugging Face checkpoints store q/k. Meta checkpoints are permuted to it on import.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, scaled as Llama 3.1 specifies."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # torch evaluates `theta ** exponent` as a correctly rounded float32 (via double); numpy's
    # float32 pow is off by one ulp for some exponents, which moves angles at 100k positions.
    powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / powers).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    low_wavelen = np.float32(scaling.original_max_position / scaling.low_freq_factor)
    high_wavelen = np.float32(scaling.original_max_position / scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept; the band
    # between is interpolated smoothly.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.float32(scaling.original_max_position) / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, float32 [batch, time, head_dim // 2], for integer `positions` [batch, time]."""
    inv_freq = jnp.asarray(
        inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    )
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` [batch, time, heads, head_dim] (rotate-half layout) by the given angles."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)
