"""pan_jax.flops against XLA's own cost analysis (the CPU backend's), which nobody here wrote."""

import jax
import jax.numpy as jnp
import pytest

from pan_jax import flops


def xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


CONVOLUTIONS = [  # (lhs NHWC, rhs HWIO, strides, padding, lhs dilation, rhs dilation, groups)
    ((2, 9, 11, 8), (3, 3, 8, 16), (1, 1), "SAME", (1, 1), (1, 1), 1),
    ((2, 9, 11, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 1),
    ((2, 16, 16, 8), (3, 3, 8, 8), (1, 1), ((4, 4), (4, 4)), (1, 1), (4, 4), 1),  # atrous
    ((1, 10, 10, 4), (7, 7, 4, 8), (2, 2), ((3, 3), (3, 3)), (1, 1), (1, 1), 1),  # stem
    ((2, 8, 8, 8), (3, 3, 2, 8), (1, 1), "SAME", (1, 1), (1, 1), 4),  # grouped
    ((2, 8, 8, 16), (1, 1, 16, 32), (1, 1), "VALID", (1, 1), (1, 1), 1),  # pointwise
    ((1, 5, 6, 4), (4, 4, 4, 4), (1, 1), ((2, 2), (2, 2)), (2, 2), (1, 1), 1),  # transposed
    # Each spatial dimension its own: a 3×5 kernel, strides, dilations and uneven padding.
    ((2, 9, 12, 4), (3, 5, 4, 8), (2, 3), ((0, 1), (3, 1)), (1, 1), (1, 2), 1),
]


@pytest.mark.parametrize("shapes", CONVOLUTIONS)
def test_convolutions_and_their_gradients_count_as_in_xla(shapes):
    lhs_shape, rhs_shape, strides, padding, lhs_dilation, rhs_dilation, groups = shapes
    lhs, rhs = jnp.ones(lhs_shape), jnp.ones(rhs_shape)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )  # fmt: skip

    assert flops.count(conv, lhs, rhs) == xla_flops(conv, lhs, rhs)
    cotangent = jnp.ones(jax.eval_shape(conv, lhs, rhs).shape)

    def gradients(x, w, g):  # the input and the weight gradient: two more convolutions
        return jax.vjp(conv, x, w)[1](g)

    counted = flops.count(gradients, lhs, rhs, cotangent)
    assert counted == xla_flops(gradients, lhs, rhs, cotangent)
    assert counted > 1.5 * flops.count(conv, lhs, rhs)


def test_matrix_products_count_as_in_xla():
    def products(a, b, c, d):
        return (
            jnp.einsum("nhwc,oh->nowc", a, b),
            a @ c,
            jnp.einsum("bij,bkj->bik", a[0], a[1]),
            jnp.einsum("nhwc,hco->nwo", a, d),  # two axes contracted at once
        )

    args = jnp.ones((3, 5, 5, 6)), jnp.ones((7, 5)), jnp.ones((6, 4)), jnp.ones((5, 6, 2))
    assert flops.count(products, *args) == xla_flops(products, *args) > 0


def test_loops_branches_calls_and_dead_work():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    one = 2 * 4 * 8 * 8

    def scanned(x, w):
        return jax.lax.scan(lambda carry, _: (carry @ w, None), x, length=5)[0]

    # XLA's count sees the body once; a step that loops over micro-batches does all of them.
    assert xla_flops(scanned, x, w) == pytest.approx(one, rel=0.1)
    assert flops.count(scanned, x, w) == 5 * one

    def while_loop(x, w):  # no static trip count: its body once
        # Only the second carry is returned; it reads the first in the next trip.
        body = lambda c: (c[0] @ w, c[1] + c[0][0, 0])  # noqa: E731
        return jax.lax.while_loop(lambda c: c[1] < 10.0, body, (x, 0.0))[1]

    assert flops.count(while_loop, x, w) == one

    def branches(x, w):
        return jax.lax.cond(x[0, 0] > 0, lambda: x @ w @ w, lambda: x @ w)

    assert flops.count(branches, x, w) == 2 * one  # the costlier branch
    assert flops.count(jax.jit(lambda x, w: (x @ w) @ w), x, w) == 2 * one
    assert flops.count(jax.checkpoint(lambda x, w: x @ w), x, w) == one

    def partly_dead(x, w):
        unused = x @ w  # noqa: F841 (dead work, as a traced gradient holds)
        nested_unused = jax.jit(lambda x: (x @ w, x + 1))(x)[1]
        return nested_unused

    assert flops.count(partly_dead, x, w) == 0
    # Work that only feeds a call's unused argument is dead too; literal outputs are no work.
    assert flops.count(lambda x, w: jax.jit(lambda a, b: a * 2)(x, x @ w), x, w) == 0
    assert flops.count(lambda x, w: jax.checkpoint(lambda a, b: a * 2)(x, x @ w), x, w) == 0
    assert flops.count(lambda x, w: jax.lax.scan(lambda c, _: (c + 1, c @ w), x, length=5)[0],
                       x, w) == 0  # fmt: skip
    assert flops.count(lambda x, w: (x @ w, 1.0), x, w) == one


def test_dead_code_elimination_is_found_where_jax_moves_it(monkeypatch):
    """jax has been deprecating names in `jax.interpreters.partial_eval`: without its
    `dce_jaxpr` the count uses jax's own module and still drops work no output needs."""
    from jax.interpreters import partial_eval

    def dead_matmul(x):
        _ = x @ x  # no output depends on it
        return x + 1

    x = jnp.ones((8, 8))
    assert flops.count(dead_matmul, x) == 0
    monkeypatch.delattr(partial_eval, "dce_jaxpr")
    assert flops.count(dead_matmul, x) == 0
    assert flops.count(lambda x: x @ x, x) == 2 * 8**3
