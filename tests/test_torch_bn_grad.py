"""bnlib.torch_bn: first and second derivatives, forward mode, torch.func transforms.

Expected values come from torch (F.batch_norm) or from finite differences (gradcheck).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from bnlib import torch_bn as tb


# every test runs on both paths of batch_norm: the speed path and the readable Function
pytestmark = pytest.mark.usefixtures("both_bn_paths")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from a seeded global generator (or from its own torch.Generator)."""
    torch.manual_seed(0)

SHAPES = [(5, 3), (4, 3, 5), (3, 3, 4, 3), (2, 3, 2, 3, 2)]
DT = torch.float64


def _args(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=DT).requires_grad_()
    w = (torch.rand(C, generator=g, dtype=DT) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=DT).requires_grad_()
    rm = torch.randn(C, generator=g, dtype=DT)
    rv = torch.rand(C, generator=g, dtype=DT) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_gradgradcheck(shape, training, affine):
    x, w, b, rm, rv = _args(shape)

    if affine:
        inputs = (x, w, b)

        def f(x, w, b):  # fresh buffer copies: training mode mutates them
            return tb.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    else:
        inputs = (x,)

        def f(x):
            return tb.batch_norm(x, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("training", [True, False])
def test_second_derivative_matches_torch(training):
    x, w, b, rm, rv = _args((4, 3, 3, 2), seed=1)

    def second(fn):
        y = fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
        gx, gw = torch.autograd.grad((y**3).sum(), (x, w), create_graph=True)
        return torch.autograd.grad((gx**2).sum() + (gw**2).sum(), (x, w, b))

    for a, e in zip(second(tb.batch_norm), second(F.batch_norm)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-10)


def test_saved_xhat_variant_passes_gradcheck_but_fails_gradgradcheck():
    x, w, b, _, _ = _args((4, 3, 3, 2), seed=2)

    def f(x, w, b):
        return tb.BatchNormFunctionSavedXHat.apply(x, w, b, 1e-5)[0]

    assert gradcheck(f, (x, w, b))
    assert not gradgradcheck(f, (x, w, b), raise_exception=False)
    # ... while the second derivative is returned without any error, and is wrong
    y = f(x, w, b)
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx**2).sum(), x)
    ye = F.batch_norm(x, None, None, w, b, True)
    (gxe,) = torch.autograd.grad((ye**3).sum(), x, create_graph=True)
    (ggxe,) = torch.autograd.grad((gxe**2).sum(), x)
    assert (ggx - ggxe).abs().max() > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_transforms(training):
    from torch.func import grad, hessian, jvp, vmap

    x, w, b, rm, rv = _args((4, 3, 2, 2), seed=3)
    x = x.detach()
    w, b = w.detach(), b.detach()
    stats = (None, None) if training else (rm, rv)

    def mine(x):
        return tb.batch_norm(x, *stats, w, b, training)

    def ref(x):
        return F.batch_norm(x, *stats, w, b, training)

    t = torch.randn_like(x)
    torch.testing.assert_close(jvp(mine, (x,), (t,))[1], jvp(ref, (x,), (t,))[1], rtol=0, atol=1e-10)
    xs = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(vmap(mine)(xs), vmap(ref)(xs), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        grad(lambda x: (mine(x) ** 3).sum())(x),
        grad(lambda x: (ref(x) ** 3).sum())(x),
        rtol=0,
        atol=1e-10,
    )
    xsm = x[:, :2, 0, 0].contiguous()
    st2 = (None, None) if training else (rm[:2], rv[:2])
    h1 = hessian(lambda z: (tb.batch_norm(z, *st2, w[:2], b[:2], training) ** 3).sum())(xsm)
    h2 = hessian(lambda z: (F.batch_norm(z, *st2, w[:2], b[:2], training) ** 3).sum())(xsm)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-10)


def test_forward_ad_matches_torch():
    import torch.autograd.forward_ad as fwAD

    x, w, b, _, _ = _args((4, 3, 5), seed=4)
    x, w, b = x.detach(), w.detach(), b.detach()
    tx, tw, tb_ = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    outs = []
    for fn in (tb.batch_norm, F.batch_norm):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, tx), None, None, fwAD.make_dual(w, tw),
                   fwAD.make_dual(b, tb_), True)
            outs.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)


def test_functional_call_and_grad_on_module():
    from torch.func import functional_call, grad

    x = torch.randn(5, 3, 4, 4, dtype=DT)
    res = []
    for cls in (tb.BatchNorm2d, torch.nn.BatchNorm2d):
        m = cls(3).double()
        params = {k: v.detach().clone() for k, v in m.named_parameters()}
        bufs = {k: v.clone() for k, v in m.named_buffers()}
        g = grad(lambda p, bb: functional_call(m, {**p, **bb}, (x,)).pow(3).sum())(params, bufs)
        res.append((g, bufs, m.num_batches_tracked.clone()))
    (g1, b1, n1), (g2, b2, n2) = res
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-10)
    for k in b2:
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=1e-12)
    assert n1 == n2 == 0  # the dict's buffers were updated, not the module's


def test_vmap_over_tracked_module_raises_like_torch():
    from torch.func import vmap

    xs = torch.randn(2, 4, 3, 2, 2)
    msgs = []
    for cls in (tb.BatchNorm2d, torch.nn.BatchNorm2d):
        with pytest.raises(RuntimeError) as ei:
            vmap(cls(3))(xs)
        msgs.append(str(ei.value))
    assert msgs[0] == msgs[1]
    m1, m2 = tb.BatchNorm2d(3, track_running_stats=False), torch.nn.BatchNorm2d(3, track_running_stats=False)
    torch.testing.assert_close(vmap(m1)(xs), vmap(m2)(xs), rtol=1e-5, atol=1e-5)
