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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core


def count(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs of one call of `fn(*args, **kwargs)` (arrays or shape-dtype structs), the whole
    global batch's work when `fn` is a step over a sharded batch."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    return jaxpr_flops(jaxpr, [True] * len(jaxpr.outvars))


def jaxpr_flops(jaxpr: jex_core.Jaxpr, live_outputs: Sequence[bool]) -> float:
    """FLOPs of the equations of a jaxpr that its `live_outputs` depend on (XLA drops the
    others: a traced gradient holds dead work), nested jaxprs included: a scan's body `length`
    times, the costliest branch of a cond, a while loop's body once (no static trip count)."""
    live = {var for var, wanted in zip(jaxpr.outvars, live_outputs, strict=True) if wanted}
    total = 0.0
    for eqn in reversed(jaxpr.eqns):
        wanted = [not isinstance(var, jex_core.DropVar) and var in live for var in eqn.outvars]
        if not any(wanted) and not eqn.effects:
            continue
        live.update(var for var in eqn.invars if not isinstance(var, jex_core.Literal))
        total += _equation_flops(eqn, wanted)
    return total


def _equation_flops(eqn: jex_core.JaxprEqn, wanted: list[bool]) -> float:
    name, params = eqn.primitive.name, eqn.params
    if name == "conv_general_dilated":
        return _conv_flops(eqn)
    if name == "dot_general":
        return _dot_flops(eqn)
    if name == "scan":  # its carries feed back: every output of the body counts
        body = params["jaxpr"].jaxpr
        return params["length"] * jaxpr_flops(body, [True] * len(body.outvars))
    if name == "cond":
        return max(jaxpr_flops(branch.jaxpr, wanted) for branch in params["branches"])
    total = 0.0
    for sub in jex_core.jaxprs_in_params(params):
        # A call (jit, remat, custom_jvp/vjp) returns its jaxpr's outputs one to one.
        one_to_one = len(sub.outvars) == len(eqn.outvars)
        total += jaxpr_flops(sub, wanted if one_to_one else [True] * len(sub.outvars))
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
