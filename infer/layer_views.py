"""Per-layer weights for CPU inference: each layer's weights as arrays of their own.

`llama_jax.model.forward` accepts `params["layers"]` as a sequence of per-layer trees (its layer
runner then loops instead of scanning). Why an engine on CPU wants that: XLA's CPU matmuls read
whole buffers, so in the scan over stacked layers each layer's weights are first copied out of
the stacked arrays, an extra read and write of every layer weight per decode step. Decoding is
bound by memory traffic; with separate arrays each matmul reads its weights in place. Training,
checkpoints and sharding keep the stacked form.
"""

from __future__ import annotations

import jax
import numpy as np

from llama_jax.model import Params


def unstack_layers(params: Params) -> Params:
    """The same weights with `layers` as a tuple of per-layer trees, each in arrays of its own.

    A stacked array on one CPU device is split into views of its own memory (see `_layer_views`),
    so the per-layer form costs no memory and no copying; other arrays are sliced (copies).
    """
    leaves, treedef = jax.tree.flatten(params["layers"])
    split = [_layer_views(x) or list(x) for x in leaves]
    per_layer = tuple(treedef.unflatten(layer) for layer in zip(*split, strict=True))
    return {**params, "layers": per_layer}


def _layer_views(x: jax.Array) -> list[jax.Array] | None:
    """`x[i]` for each i as arrays aliasing `x`'s buffer, when `x` lives on one CPU device.

    `np.asarray` of a CPU array is a view of its buffer, and `device_put` of a contiguous,
    aligned numpy array adopts that memory instead of copying it; each view keeps `x`'s buffer
    alive. While views exist, a jitted call asked to donate `x` does not (XLA sees the external
    references), so nothing overwrites the views' memory. None where this does not apply.
    """
    devices = x.sharding.device_set
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    host = np.asarray(x)
    return [jax.device_put(host[i], x.sharding) for i in range(x.shape[0])]
