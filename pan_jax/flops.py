"""FLOPs of a JAX function, counted from its jaxpr: the multiply-adds of its convolutions and
matrix products, times two, as XLA's cost analysis counts them (a convolution's window positions
that fall on padding or on the holes of a dilated input are not work).

Why not XLA's own count (`jit(f).lower(...).cost_analysis()["flops"]`): jax 0.11's CUDA plugin
returns none; it counts a loop's body once (a scan over micro-batches would read as one); and it
adds elementwise work, which MFU is not measured against. This count is the same on every
backend, and `tests/test_flops.py` holds it equal to XLA's on the CPU for convolutions and
matrix products, their gradients included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import partial_eval


def count(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs of one call of `fn(*args, **kwargs)` (arrays or shape-dtype structs): the whole
    global batch's work when `fn` is jitted over a sharded batch (inside a `shard_map`, a
    body's shapes and so its count are one shard's)."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    # Without the work no output depends on, as XLA drops it: a traced gradient holds some.
    live, _ = _dce_jaxpr()(jaxpr, [True] * len(jaxpr.outvars))
    return jaxpr_flops(live)


def _dce_jaxpr() -> Callable:
    """jax's dead-code elimination of a jaxpr: public in `jax.interpreters.partial_eval` up to
    jax 0.10 at least, which has been deprecating names there; else jax's own module."""
    dce = getattr(partial_eval, "dce_jaxpr", None)
    if dce is None:
        from jax._src.interpreters.partial_eval import dce_jaxpr as dce
    return dce


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
    """FLOPs of every equation of a jaxpr, nested jaxprs included: a scan's body `length`
    times, the costliest branch of a cond, a while loop's body once (no static trip count)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in params["branches"])
        else:
            total += sum(jaxpr_flops(sub) for sub in jex_core.jaxprs_in_params(params))
    return total


def _dot_flops(eqn: jex_core.JaxprEqn) -> float:
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contracting)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn: jex_core.JaxprEqn) -> float:
    params = eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    lhs_shape, rhs_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    lhs_dilation = params["lhs_dilation"] or (1,) * len(params["window_strides"])
    rhs_dilation = params["rhs_dilation"] or (1,) * len(params["window_strides"])
    # Each output element of a spatial dimension meets the kernel taps that land on a real input
    # element (not padding, not a hole of lhs dilation); the dimensions count independently.
    taps = 1
    for i in range(len(params["window_strides"])):
        size = lhs_shape[lhs_spec[2 + i]]
        out = np.arange(out_shape[out_spec[2 + i]])[:, None]
        kernel = np.arange(rhs_shape[rhs_spec[2 + i]])[None, :]
        position = out * params["window_strides"][i] - params["padding"][i][0]
        position = position + kernel * rhs_dilation[i]
        dilated_size = (size - 1) * lhs_dilation[i] + 1
        real = (position >= 0) & (position < dilated_size) & (position % lhs_dilation[i] == 0)
        taps *= int(real.sum())
    batch, features = out_shape[out_spec[0]], out_shape[out_spec[1]]
    return 2.0 * batch * features * rhs_shape[rhs_spec[1]] * taps
