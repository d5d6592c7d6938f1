"""bnlib.torch_bn_fast, the speed path of ``bnlib.torch_bn.batch_norm``: where it runs, and that it computes what
the readable ``BatchNormFunction`` computes (outputs, running buffers, gradients, second derivatives, batched
gradients, accuracy) while allocating fewer input-sized tensors.

Expected values come from the readable Function (``torch_bn_fast.disabled()``), from torch's own batch norm, or
from float64.  The other ``tests/test_torch_bn_*.py`` files run all their tests on both paths as well.
"""

import pytest
import torch
import torch.nn.functional as F

from bnlib import torch_bn as tb
from bnlib import torch_bn_fast as tf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = "FastBatchNormFunctionBackward"
READABLE = "BatchNormFunctionWithJvpBackward"


def _inputs(shape, dtype=torch.float32, affine=True, buffers=True, memory_format=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    w = torch.rand(C, generator=g, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(C, generator=g, dtype=dtype) if affine else None
    rm = torch.randn(C, generator=g, dtype=dtype) if buffers else None
    rv = torch.rand(C, generator=g, dtype=dtype) + 0.5 if buffers else None
    dy = torch.randn(shape, generator=g, dtype=dtype)
    return x, w, b, rm, rv, dy


def _forward_backward(x, w, b, rm, rv, dy, fn=tb.batch_norm):
    """y, grad_fn name, running buffers after the call, and the gradients of (x, weight, bias)."""
    x = x.clone().requires_grad_()
    params = [t.clone().requires_grad_() if t is not None else None for t in (w, b)]
    rm, rv = (t.clone() if t is not None else None for t in (rm, rv))
    y = fn(x, rm, rv, *params, True, 0.1, 1e-5)
    leaves = [t for t in (x, *params) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), type(y.grad_fn).__name__, rm, rv, grads


def test_eager_training_in_float32_and_float64_runs_the_speed_path():
    for dtype in (torch.float32, torch.float64):
        x, w, b, rm, rv, dy = _inputs((6, 4), dtype)
        assert _forward_backward(x, w, b, rm, rv, dy)[1] == FAST
        with tf.disabled():
            assert _forward_backward(x, w, b, rm, rv, dy)[1] == READABLE
        assert _forward_backward(x, w, b, rm, rv, dy)[1] == FAST  # disabled() restores the switch


def test_everything_else_runs_the_readable_function():
    x, w, b, rm, rv, dy = _inputs((6, 4))
    xg = x.clone().requires_grad_()
    # eval mode, and half input (computed in float32 by the readable Function)
    assert type(tb.batch_norm(xg, rm, rv, w, b, False).grad_fn).__name__ == READABLE
    half = tb.batch_norm(xg.half(), None, None, w, b, True)
    assert type(half.grad_fn).__name__ == READABLE
    # forward-mode AD
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not tf.use_fast_path(x, True)
        y = tb.batch_norm(fwAD.make_dual(x, torch.ones_like(x)), None, None, w, b, True)
        assert fwAD.unpack_dual(y).tangent is not None
    assert tf.use_fast_path(x, True)
    # torch.func transforms need setup_context
    seen = []

    def probe(t):
        seen.append(tf.use_fast_path(t, True))
        return t

    torch.func.vmap(probe)(x)
    torch.func.grad(lambda t: probe(t).sum())(x)
    assert seen == [False, False]
    # while torch.compile traces
    compiled = torch.compile(lambda t: t + 1 if tf.use_fast_path(t, True) else t - 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), x - 1)


CASES = [((8, 5), None), ((4, 5, 3), None), ((3, 5, 4, 2), None), ((3, 5, 4, 2), torch.channels_last),
         ((2, 5, 2, 3, 2), None), ((2, 5, 2, 3, 2), torch.channels_last_3d)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("params", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
@pytest.mark.parametrize("shape, memory_format", CASES, ids=lambda c: str(c))
def test_speed_path_computes_what_the_readable_function_computes(shape, memory_format, dtype, params, buffers):
    # every combination of weight and bias: each takes its own branch for k and shift
    x, w, b, rm, rv, dy = _inputs(shape, dtype, True, buffers, memory_format)
    args = (x, w if "weight" in params else None, b if "bias" in params else None, rm, rv, dy)
    y, name, rm, rv, grads = _forward_backward(*args)
    with tf.disabled():
        y_ref, name_ref, rm_ref, rv_ref, grads_ref = _forward_backward(*args)
    assert (name, name_ref) == (FAST, READABLE)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    assert y.stride() == y_ref.stride()  # memory format kept
    if buffers:
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)
    # and both are torch's batch norm
    y_torch, _, rm_torch, rv_torch, grads_torch = _forward_backward(*args, fn=F.batch_norm)
    torch.testing.assert_close(y, y_torch, **tol)
    for g, g_t in zip(grads, grads_torch):
        torch.testing.assert_close(g, g_t, **tol)


def test_second_derivatives_are_the_readable_functions():
    # create_graph=True: the speed path's backward hands over to the readable (twice differentiable) one
    x, w, b, _, _, dy = _inputs((6, 3, 2), torch.float64)

    def hvp():
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = tb.batch_norm(xx, None, None, ww, b, True)
        gx, gw = torch.autograd.grad(y, (xx, ww), dy, create_graph=True)
        name = type(y.grad_fn).__name__
        return name, torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (xx, ww))

    name, fast = hvp()
    with tf.disabled():
        name_ref, ref = hvp()
    assert (name, name_ref) == (FAST, READABLE)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *t: tb.batch_norm(t[0], None, None, t[1], t[2], True), (xx, ww, bb))


def test_batched_gradients_equal_one_at_a_time():
    # autograd.grad(is_grads_batched=True) runs the backward under vmap: dy carries a batch dim that x does not
    x, w, b, _, _, _ = _inputs((5, 3, 2), torch.float64)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = tb.batch_norm(x, None, None, w, b, True)
    assert type(y.grad_fn).__name__ == FAST
    dys = torch.randn((4, *y.shape), dtype=y.dtype)
    batched = torch.autograd.grad(y, (x, w), dys, retain_graph=True, is_grads_batched=True)
    for i in range(len(dys)):
        one = torch.autograd.grad(y, (x, w), dys[i], retain_graph=True)
        for g_b, g in zip(batched, one):
            torch.testing.assert_close(g_b[i], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 5, 5)], ids=str)
def test_speed_path_allocates_five_input_sized_tensors(shape, load_bench):
    # forward: d = x - mu0 and its square, which y overwrites; backward: x - mu, dy * (x - mu), and dx
    # (the bench's counter is the one the appendix prints)
    bench = load_bench("bench_torch_bn")
    assert bench.input_sized_allocations(tb.batch_norm, shape) == (2, 5)
    fwd_r, total_r = bench.input_sized_allocations(bench.readable_batch_norm, shape)
    assert total_r >= 10, (fwd_r, total_r)  # one per line of the readable Function
    assert bench.input_sized_allocations(F.batch_norm, shape) == (1, 2)  # the counter sees torch's y and dx


def test_float32_statistics_stay_accurate_when_the_mean_is_large():
    # |mu| >> sigma: E[x^2] - mu^2 would lose every digit; the corrected two-pass keeps the error at torch's level
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(64, 8, generator=g)
    exact_mean, exact_var = x.double().mean(0), x.double().var(0)
    errors = {}
    for name, fn in (("fast", tb.batch_norm), ("torch", F.batch_norm)):
        rm, rv = torch.zeros(8), torch.zeros(8)
        y = fn(x, rm, rv, None, None, True, 1.0, 1e-5)
        y64 = (x.double() - exact_mean) / torch.sqrt(x.double().var(0, correction=0) + 1e-5)
        errors[name] = ((rm.double() - exact_mean).abs().max().item(), (rv.double() - exact_var).abs().max().item(),
                        (y.double() - y64).abs().max().item())
    ulp_mean = torch.finfo(torch.float32).eps * 1e4
    for ours, theirs in zip(errors["fast"], errors["torch"]):
        assert ours <= 4 * theirs + 4 * ulp_mean, errors
    assert errors["fast"][1] < 1e-3 * exact_var.min().item(), errors  # the variance keeps its leading digits
