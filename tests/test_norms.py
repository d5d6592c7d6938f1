"""bnlib.norms against torch: layer, instance and group norm (NumPy and torch), batch renorm, ghost batch norm.

Expected values come from torch (F.layer_norm, F.group_norm, F.instance_norm, F.batch_norm, the nn modules) or
from a hand computation in the test; never from bnlib.norms itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from bnlib import norms
from bnlib.mnist import cnn_data
from bnlib.models import SeedCNN
from bnlib.results import load_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-10  # float64 parity: forward and backward


def _t(shape, seed, scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _grads(f, dy, *args):
    """[y, grad of every tensor in args] of sum(f(*args) * dy); None args are skipped."""
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    y = f(*leaves)
    wrt = [a for a in leaves if a is not None]
    return [y.detach()] + list(torch.autograd.grad(y, wrt, dy))


def _close(mine, ref, tol=TOL):
    assert len(mine) == len(ref)
    for a, e in zip(mine, ref):
        a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
        assert a.shape == e.shape
        err = float((a.to(torch.float64) - e).abs().max()) if e.numel() else 0.0
        assert err <= tol, err


def _numpy_out(y, cache, dy, has_w, has_b):
    dx, dw, db = norms.norm_backward(dy.numpy(), cache)
    out = [y, dx] + ([dw] if has_w else []) + ([db] if has_b else [])
    assert (dw is None) != has_w and (db is None) != has_b
    return out


# ------------------------------------------------------------------------------------------- layer norm
LN_CASES = [((5, 7), (7,)), ((3, 4, 5), (5,)), ((3, 4, 5), (4, 5)), ((2, 3, 4, 5), (3, 4, 5)), ((6, 2), (2,))]


@pytest.mark.parametrize("shape,nshape", LN_CASES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_parity(shape, nshape, affine):
    x, dy = _t(shape, 1), _t(shape, 2, 1.0, 0.0)
    w = _t(nshape, 3, 0.5, 1.0) if affine != "none" else None
    b = _t(nshape, 4) if affine == "both" else None
    args = [a for a in (w, b) if a is not None]

    def call(fn):
        def f(x, *p):
            it = iter(p)
            return fn(x, nshape, next(it) if w is not None else None, next(it) if b is not None else None, 1e-5)
        return f

    ref = _grads(call(F.layer_norm), dy, x, *args)
    _close(_grads(call(norms.layer_norm), dy, x, *args), ref)
    y, cache = norms.layer_norm_forward(x.numpy(), nshape, None if w is None else w.numpy(),
                                        None if b is None else b.numpy())
    _close(_numpy_out(y, cache, dy, w is not None, b is not None), ref)


def test_layer_norm_modules_match_torch():
    x, dy = _t((4, 3, 5), 5), _t((4, 3, 5), 6)
    ref = nn.LayerNorm((3, 5), dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_t((3, 5), 7)), ref.bias.copy_(_t((3, 5), 8))
    mine = norms.TorchLayerNorm((3, 5), dtype=torch.float64)
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        m.zero_grad()
        (m(x) * dy).sum().backward()
    assert torch.allclose(mine(x), ref(x), rtol=0, atol=TOL)
    assert torch.allclose(mine.weight.grad, ref.weight.grad, rtol=0, atol=TOL)
    npl = norms.LayerNorm((3, 5), dtype=np.float64)
    npl.weight[...], npl.bias[...] = ref.weight.detach().numpy(), ref.bias.detach().numpy()
    xr = x.clone().requires_grad_()
    ref.zero_grad()
    (ref(xr) * dy).sum().backward()
    y = npl(x.numpy())
    dx = npl.backward(dy.numpy())
    _close([y, dx, npl.dweight, npl.dbias], [ref(x).detach(), xr.grad, ref.weight.grad, ref.bias.grad])


# ------------------------------------------------------------------------------------------- group norm
GN_CASES = [((4, 6), 3), ((4, 6), 6), ((3, 6, 5), 2), ((2, 8, 3, 4), 4), ((2, 8, 3, 4), 1), ((2, 8, 3, 4), 8),
            ((1, 4, 2, 3), 2), ((2, 6, 2, 2, 3), 3)]


@pytest.mark.parametrize("shape,G", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_parity(shape, G, affine):
    C = shape[1]
    x, dy = _t(shape, 11), _t(shape, 12, 1.0, 0.0)
    w, b = (_t((C,), 13, 0.5, 1.0), _t((C,), 14)) if affine else (None, None)
    args = [w, b] if affine else []

    def call(fn):
        return (lambda x, w, b: fn(x, G, w, b, 1e-3)) if affine else (lambda x: fn(x, G, None, None, 1e-3))

    ref = _grads(call(F.group_norm), dy, x, *args)
    _close(_grads(call(norms.group_norm), dy, x, *args), ref)
    y, cache = norms.group_norm_forward(x.numpy(), G, None if w is None else w.numpy(),
                                        None if b is None else b.numpy(), 1e-3)
    _close(_numpy_out(y, cache, dy, affine, affine), ref)


def test_group_norm_limits_are_layer_and_instance_norm():
    """G = 1: layer norm over (C, H, W); G = C: instance norm (both from torch)."""
    x = _t((3, 6, 4, 5), 15)
    ln = F.layer_norm(x, x.shape[1:])
    inn = F.instance_norm(x)
    assert float((norms.group_norm(x, 1) - ln).abs().max()) < TOL
    assert float((norms.group_norm(x, 6) - inn).abs().max()) < TOL
    assert float(np.abs(norms.group_norm_forward(x.numpy(), 1)[0] - ln.numpy()).max()) < TOL
    assert float(np.abs(norms.group_norm_forward(x.numpy(), 6)[0] - inn.numpy()).max()) < TOL


def test_group_norm_modules_match_torch():
    x, dy = _t((3, 6, 4, 4), 16), _t((3, 6, 4, 4), 17)
    ref = nn.GroupNorm(3, 6, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_t((6,), 18)), ref.bias.copy_(_t((6,), 19))
    mine = norms.TorchGroupNorm(3, 6, dtype=torch.float64)
    mine.load_state_dict(ref.state_dict())
    npg = norms.GroupNorm(3, 6, dtype=np.float64)
    npg.weight[...], npg.bias[...] = ref.weight.detach().numpy(), ref.bias.detach().numpy()
    out = []
    for m in (ref, mine):
        xr = x.clone().requires_grad_()
        m.zero_grad()
        y = m(xr)
        (y * dy).sum().backward()
        out.append([y.detach(), xr.grad, m.weight.grad, m.bias.grad])
    _close(out[1], out[0])
    y = npg(x.numpy())
    _close([y, npg.backward(dy.numpy()), npg.dweight, npg.dbias], out[0])
    assert mine.extra_repr() == ref.extra_repr() and isinstance(mine, nn.GroupNorm)


# ---------------------------------------------------------------------------------------- instance norm
IN_CONFIGS = [dict(), dict(affine=True), dict(track_running_stats=True), dict(affine=True, track_running_stats=True),
              dict(track_running_stats=True, momentum=None), dict(affine=True, track_running_stats=True,
                                                                   momentum=0.5, eps=1e-2)]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("cfg", IN_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_instance_norm_modules_over_steps(dims, cfg):
    """torch's InstanceNorm, bnlib's torch drop-in and bnlib's NumPy layer: outputs, grads and buffers, over
    training steps, then eval, then training again, with batched and unbatched input."""
    C = 4
    ref_cls, mine_cls, np_cls = ((nn.InstanceNorm1d, norms.TorchInstanceNorm1d, norms.InstanceNorm1d) if dims == 1
                                 else (nn.InstanceNorm2d, norms.TorchInstanceNorm2d, norms.InstanceNorm2d))
    ref = ref_cls(C, dtype=torch.float64, **cfg)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(_t((C,), 21, 0.5, 1.0)), ref.bias.copy_(_t((C,), 22))
    mine = mine_cls(C, dtype=torch.float64, **cfg)
    mine.load_state_dict(ref.state_dict())
    npl = np_cls(C, dtype=np.float64, **cfg)
    if ref.affine:
        npl.weight[...], npl.bias[...] = ref.weight.detach().numpy(), ref.bias.detach().numpy()
    spatial = (5,) if dims == 1 else (3, 4)
    for step in range(6):
        if step == 3:
            ref.eval(), mine.eval(), npl.eval()
        if step == 5:
            ref.train(), mine.train(), npl.train()
        shape = (C, *spatial) if step == 4 else (3, C, *spatial)  # step 4: unbatched
        x, dy = _t(shape, 100 + step, 2.0, 3.0), _t(shape, 200 + step, 1.0, 0.0)
        results = []
        for m in (ref, mine):
            xr = x.clone().requires_grad_()
            m.zero_grad()
            y = m(xr)
            (y * dy).sum().backward()
            results.append([y.detach(), xr.grad] + ([m.weight.grad, m.bias.grad] if m.affine else []))
        _close(results[1], results[0])
        y = npl(x.numpy())
        dx = npl.backward(dy.numpy())
        _close([y, dx] + ([npl.dweight, npl.dbias] if npl.affine else []), results[0])
        if ref.track_running_stats:
            for name in ("running_mean", "running_var"):
                e = getattr(ref, name)
                assert float((getattr(mine, name) - e).abs().max()) < 1e-12
                assert float(np.abs(getattr(npl, name) - e.numpy()).max()) < 1e-12


def test_instance_norm_functional_running_stats():
    x = _t((5, 3, 7), 30)
    rm, rv = _t((3,), 31), _t((3,), 32, 0.1, 1.0)
    ref_m, ref_v, my_m, my_v = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y_ref = F.instance_norm(x, ref_m, ref_v, momentum=0.2)
    y = norms.instance_norm(x, my_m, my_v, momentum=0.2)
    assert float((y - y_ref).abs().max()) < TOL
    # the rule, by hand: the mean over examples of the per-instance mean and unbiased variance
    mu = x.mean(2).mean(0)
    var = x.var(2, unbiased=True).mean(0)
    assert torch.allclose(ref_m, 0.8 * rm + 0.2 * mu, rtol=0, atol=1e-12)
    assert torch.allclose(my_m, 0.8 * rm + 0.2 * mu, rtol=0, atol=1e-12)
    assert torch.allclose(my_v, 0.8 * rv + 0.2 * var, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ gradcheck, twice
def _small(shape, seed):
    return _t(shape, seed).requires_grad_()


@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm", "instance_norm_eval"])
def test_gradcheck_and_gradgradcheck(name):
    x = _small((2, 4, 3), 40)
    w, b = _small((4,), 41), _small((4,), 42)
    if name == "layer_norm":
        wl, bl = _small((4, 3), 43), _small((4, 3), 44)
        args, f = (x, wl, bl), lambda x, w, b: norms.layer_norm(x, (4, 3), w, b)
    elif name == "group_norm":
        args, f = (x, w, b), lambda x, w, b: norms.group_norm(x, 2, w, b)
    elif name == "instance_norm":
        args, f = (x, w, b), lambda x, w, b: norms.instance_norm(x, None, None, w, b)
    else:
        rm, rv = _t((4,), 45), _t((4,), 46, 0.1, 1.0)
        args, f = (x, w, b), lambda x, w, b: norms.instance_norm(x, rm.clone(), rv.clone(), w, b, False)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_gradcheck_renorm_and_ghost():
    """With momentum 0 the buffers stay put, so the function is fixed between gradcheck's evaluations. Renorm's
    r and d are constants for autograd: its gradient is the true one only where both are clipped (locally
    constant); where they are not, gradcheck must fail (stop_gradient is a deliberate approximation)."""
    x = _small((6, 3, 2, 2), 50)
    clipped = norms.BatchRenorm2d(3, momentum=0.0, r_max=1.5, d_max=0.5, dtype=torch.float64)
    _set_running(clipped, torch.full((3,), -10.0, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64))
    gb = norms.GhostBatchNorm2d(3, 2, momentum=0.0, dtype=torch.float64)
    for m in (clipped, gb):
        assert torch.autograd.gradcheck(m, (x,))
        assert torch.autograd.gradgradcheck(m, (x,))
    assert torch.allclose(clipped.last_r, torch.full_like(clipped.last_r, 1.5))
    free = norms.BatchRenorm2d(3, momentum=0.0, r_max=1e6, d_max=1e6, dtype=torch.float64)
    _set_running(free, _t((3,), 51), _t((3,), 52, 0.5, 2.0))
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(free, (x,))


# ------------------------------------------------------------------------------------------------ errors
def _raised(f):
    try:
        f()
    except Exception as e:  # noqa: BLE001 - the test compares the exception itself
        return type(e), str(e)
    return None


ERROR_CASES = {
    "ln shape": (lambda m, x: m["layer_norm"](x((3, 4, 5)), (4,))),
    "ln too many dims": (lambda m, x: m["layer_norm"](x((3, 4, 5)), (3, 4, 5, 6))),
    "ln weight shape": (lambda m, x: m["layer_norm"](x((3, 4, 5)), (4, 5), x((5,)))),
    "ln bias shape": (lambda m, x: m["layer_norm"](x((3, 4, 5)), (4, 5), None, x((4,)))),
    "gn groups": (lambda m, x: m["group_norm"](x((2, 6, 5)), 4)),
    "gn 1-d": (lambda m, x: m["group_norm"](x((6,)), 3)),
    "gn one value per group": (lambda m, x: m["group_norm"](x((1, 3)), 3)),
    "gn weight size": (lambda m, x: m["group_norm"](x((2, 6, 5)), 3, x((5,)))),
    "in one spatial element": (lambda m, x: m["instance_norm"](x((2, 4, 1)))),
    "in buffer size": (lambda m, x: m["instance_norm"](x((2, 4, 3)), x((3,)), x((3,)))),
}


def _torch_fns():
    return {"layer_norm": F.layer_norm, "group_norm": F.group_norm, "instance_norm": F.instance_norm}


def _bnlib_torch_fns():
    return {"layer_norm": norms.layer_norm, "group_norm": norms.group_norm, "instance_norm": norms.instance_norm}


def _numpy_fns():
    return {"layer_norm": norms.layer_norm_forward, "group_norm": norms.group_norm_forward,
            "instance_norm": norms.instance_norm_forward}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(case):
    make = ERROR_CASES[case]
    expected = _raised(lambda: make(_torch_fns(), lambda s: torch.ones(s, dtype=torch.float64)))
    assert expected is not None
    assert _raised(lambda: make(_bnlib_torch_fns(), lambda s: torch.ones(s, dtype=torch.float64))) == expected
    assert _raised(lambda: make(_numpy_fns(), lambda s: np.ones(s))) == expected


@pytest.mark.parametrize("build,shape", [
    (lambda lib: lib["InstanceNorm1d"](4), (2, 4, 5, 6)),
    (lambda lib: lib["InstanceNorm2d"](4), (4, 5)),
    (lambda lib: lib["InstanceNorm2d"](4, affine=True), (2, 3, 5, 5)),
    (lambda lib: lib["InstanceNorm1d"](4, affine=True), (3, 5)),
    (lambda lib: lib["GroupNorm"](4, 6), None),
])
def test_module_errors_match_torch(build, shape):
    torch_lib = {"InstanceNorm1d": nn.InstanceNorm1d, "InstanceNorm2d": nn.InstanceNorm2d, "GroupNorm": nn.GroupNorm}
    mine_t = {"InstanceNorm1d": norms.TorchInstanceNorm1d, "InstanceNorm2d": norms.TorchInstanceNorm2d,
              "GroupNorm": norms.TorchGroupNorm}
    mine_np = {"InstanceNorm1d": norms.InstanceNorm1d, "InstanceNorm2d": norms.InstanceNorm2d,
               "GroupNorm": norms.GroupNorm}

    def run(lib, x):
        return lambda: build(lib)(x(shape)) if shape is not None else build(lib)

    expected = _raised(run(torch_lib, torch.ones))
    assert expected is not None
    assert _raised(run(mine_t, torch.ones)) == expected
    assert _raised(run(mine_np, lambda s: np.ones(s, np.float32))) == expected


# --------------------------------------------------------------------------------------- batch renorm
def _bn_pair(cls, C=3, **kw):
    ref = nn.BatchNorm2d(C, dtype=torch.float64, momentum=kw.get("momentum", 0.01))
    with torch.no_grad():
        ref.weight.copy_(_t((C,), 60, 0.5, 1.0)), ref.bias.copy_(_t((C,), 61))
    mine = cls(C, dtype=torch.float64, **kw)
    mine.load_state_dict(ref.state_dict())
    return mine, ref


def _module_step(m, x, dy):
    xr = x.clone().requires_grad_()
    m.zero_grad()
    y = m(xr)
    (y * dy).sum().backward()
    return [y.detach(), xr.grad, m.weight.grad, m.bias.grad]


def test_renorm_with_rmax_1_dmax_0_is_batch_norm():
    mine, ref = _bn_pair(norms.BatchRenorm2d, r_max=1.0, d_max=0.0)
    for step in range(5):
        if step == 4:
            mine.eval(), ref.eval()
        x, dy = _t((4, 3, 2, 3), 70 + step, 3.0, 2.0), _t((4, 3, 2, 3), 80 + step)
        _close(_module_step(mine, x, dy), _module_step(ref, x, dy))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(mine, name).double(), getattr(ref, name).double(), rtol=0, atol=1e-12)


def _set_running(m, mean, var):
    with torch.no_grad():
        m.running_mean.copy_(mean), m.running_var.copy_(var)


def test_renorm_unclipped_training_output_is_the_inference_output():
    """r, d inside their bounds: (x - mu_B)/sigma_B * r + d = (x - mu)/sigma, what eval computes (torch, eval)."""
    mine, ref = _bn_pair(norms.BatchRenorm2d, r_max=1e6, d_max=1e6)
    mean, var = _t((3,), 90), _t((3,), 91, 0.5, 2.0)
    _set_running(mine, mean, var)
    x = _t((4, 3, 2, 3), 92, 3.0, 2.0)
    y_train = mine(x)
    y_eval = F.batch_norm(x, mean, var, ref.weight, ref.bias, training=False, eps=mine.eps)
    assert float((y_train - y_eval).detach().abs().max()) < TOL
    r, d = mine.last_r, mine.last_d
    assert not torch.allclose(r, torch.ones_like(r)) and not torch.allclose(d, torch.zeros_like(d))


def test_renorm_clips_r_and_d():
    mine, _ = _bn_pair(norms.BatchRenorm2d, r_max=2.0, d_max=0.5, momentum=0.0)
    x = _t((8, 3, 4, 4), 93, 1.0, 0.0)
    x[:, 0] = x[:, 0] * 10 + 3     # sigma_B / sigma ~ 10, (mu_B - mu)/sigma ~ 3: both clipped
    x[:, 1] = x[:, 1] * 0.05 - 4   # sigma_B / sigma ~ 0.05 (clipped at 1/2), d clipped at -0.5
    x[:, 2] = x[:, 2] * 1.2 + 0.1  # inside both bounds
    _set_running(mine, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    y = mine(x)
    mu_b = x.mean((0, 2, 3))
    sigma_b = torch.sqrt(x.var((0, 2, 3), unbiased=False) + mine.eps)
    sigma = math.sqrt(1 + mine.eps)
    r_free, d_free = sigma_b / sigma, mu_b / sigma
    assert torch.allclose(mine.last_r, torch.stack([torch.tensor(2.0, dtype=torch.float64),
                                                    torch.tensor(0.5, dtype=torch.float64), r_free[2]]))
    assert torch.allclose(mine.last_d, torch.stack([torch.tensor(0.5, dtype=torch.float64),
                                                    torch.tensor(-0.5, dtype=torch.float64), d_free[2]]))
    # the output uses the clipped r and d, with torch's BN (no affine) for x_hat
    x_hat = F.batch_norm(x, None, None, training=True, eps=mine.eps)
    shape = (1, 3, 1, 1)
    expected = (x_hat * mine.last_r.view(shape) + mine.last_d.view(shape)) * mine.weight.view(shape) \
        + mine.bias.view(shape)
    assert float((y - expected).detach().abs().max()) < TOL


def test_renorm_gradient_treats_r_and_d_as_constants():
    """dx of renorm = dx of batch norm with the upstream gradient scaled by r per channel (torch's BN)."""
    mine, ref = _bn_pair(norms.BatchRenorm2d, r_max=3.0, d_max=5.0, momentum=0.0)
    _set_running(mine, _t((3,), 94), _t((3,), 95, 0.2, 1.5))
    x, dy = _t((4, 3, 2, 3), 96, 1.5, 0.5), _t((4, 3, 2, 3), 97)
    dx = _module_step(mine, x, dy)[1]
    r = mine.last_r.view(1, 3, 1, 1)
    assert not torch.allclose(r, torch.ones_like(r))
    xr = x.clone().requires_grad_()
    y_bn = F.batch_norm(xr, None, None, ref.weight, ref.bias, training=True, eps=mine.eps)
    (dx_bn,) = torch.autograd.grad(y_bn, [xr], dy * r)
    assert float((dx - dx_bn).abs().max()) < TOL


def test_renorm_limits_follow_the_paper_schedule():
    """Paper: (1, 0) until 5k of 40k steps; d_max = 5 from 25k; r_max = 3 at 40k; linear in between."""
    assert norms.renorm_limits(0, 40_000) == (1.0, 0.0)
    assert norms.renorm_limits(5_000, 40_000) == (1.0, 0.0)
    r, d = norms.renorm_limits(25_000, 40_000)
    assert d == pytest.approx(5.0) and r == pytest.approx(1 + 2 * 20 / 35)
    assert norms.renorm_limits(40_000, 40_000) == pytest.approx((3.0, 5.0))
    assert norms.renorm_limits(15_000, 40_000)[1] == pytest.approx(5 * 10 / 20)


# ---------------------------------------------------------------------------------------------- ghost BN
def test_ghost_with_one_ghost_batch_is_batch_norm():
    mine, ref = _bn_pair(norms.GhostBatchNorm2d, ghost_batch_size=6, momentum=0.1)
    for step in range(4):
        if step == 3:
            mine.eval(), ref.eval()
        x, dy = _t((6, 3, 2, 2), 110 + step, 2.0, 1.0), _t((6, 3, 2, 2), 120 + step)
        _close(_module_step(mine, x, dy), _module_step(ref, x, dy))
        assert torch.allclose(mine.running_var, ref.running_var, rtol=0, atol=1e-12)


def test_ghost_batches_are_normalised_separately():
    """Three ghost batches of 2: each equals torch's BN on that chunk; buffers move to the chunks' mean."""
    mine, ref = _bn_pair(norms.GhostBatchNorm2d, ghost_batch_size=2, momentum=0.1)
    x, dy = _t((6, 3, 2, 2), 130, 2.0, 1.0), _t((6, 3, 2, 2), 131)
    got = _module_step(mine, x, dy)
    xr = x.clone().requires_grad_()
    w, b = ref.weight.detach().clone().requires_grad_(), ref.bias.detach().clone().requires_grad_()
    chunks, means, vars_ = [], [], []
    for k in range(3):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        chunks.append(F.batch_norm(xr[2 * k: 2 * k + 2], rm, rv, w, b, training=True, momentum=1.0))
        means.append(rm), vars_.append(rv)  # momentum 1: the chunk's mean and unbiased variance
    y = torch.cat(chunks)
    grads = torch.autograd.grad(y, [xr, w, b], dy)
    _close(got, [y.detach(), *grads])
    assert torch.allclose(mine.running_mean, 0.1 * torch.stack(means).mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(mine.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0), rtol=0, atol=1e-12)
    # differs from batch norm over the whole batch
    whole = F.batch_norm(x, None, None, ref.weight, ref.bias, training=True).detach()
    assert float((got[0] - whole).abs().max()) > 0.01


def test_ghost_batch_size_must_divide_the_batch():
    gb = norms.GhostBatchNorm2d(3, 4)
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of ghost_batch_size 4"):
        gb(torch.ones(6, 3, 2, 2))


# ------------------------------------------------------------------------------------- float32 numerics
def test_float32_group_norm_error_is_torchs_order():
    """float32: bnlib (NumPy and torch) against the float64 result of the same rounded inputs, at most 1.5 times
    torch's own float32 error (plus a rounding-level floor)."""
    x = (_t((8, 16, 6, 6), 140, 3.0, 10.0)).float()
    ref64 = F.group_norm(x.double(), 4)
    err_torch = float((F.group_norm(x, 4).double() - ref64).abs().max())
    err_t = float((norms.group_norm(x, 4).double() - ref64).abs().max())
    err_np = float(np.abs(norms.group_norm_forward(x.numpy(), 4)[0].astype(np.float64) - ref64.numpy()).max())
    floor = 4 * float(torch.finfo(torch.float32).eps)
    assert err_t <= 1.5 * err_torch + floor and err_np <= 1.5 * err_torch + floor


# ------------------------------------------------------------------------------------------ the models
@pytest.mark.parametrize("norm", ["none", "bn", "gn", "ln", "renorm"])
def test_small_batch_model_is_the_seed_cnn_with_the_norm_swapped(norm):
    torch.manual_seed(0)
    model = norms.small_batch_model(norm)
    assert isinstance(model, SeedCNN)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # the seed CNN's layers, in its order; the norm where its BN layers sit (after conv1, conv2, fc1)
    ref = SeedCNN(bn=False)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m.weight.shape for m in layers] == [m.weight.shape for m in ref.modules()
                                                if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m.bias is None for m in layers] == [norm != "none"] * 3 + [False]
    normed = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))]
    expected = {"none": [], "bn": ["BatchNorm2d", "BatchNorm2d", "BatchNorm1d"],
                "gn": ["GroupNorm"] * 3, "ln": ["GroupNorm"] * 3,
                "renorm": ["BatchRenorm2d", "BatchRenorm2d", "BatchRenorm1d"]}[norm]
    assert [type(m).__name__ for m in normed] == expected
    assert [getattr(m, "num_groups", None) for m in normed] == {"gn": [4] * 3, "ln": [1] * 3}.get(
        norm, [None] * len(normed))
    assert [getattr(m, "num_channels", getattr(m, "num_features", None)) for m in normed] == (
        [] if norm == "none" else [32, 64, 128])
    with pytest.raises(ValueError, match="unknown norm"):
        norms.small_batch_model("wn")


def test_small_batch_data_is_cnn_data():
    cfg = norms.SmallBatchConfig(train_size=300, test_size=200, data_seed=3)
    for a, b in zip(norms.small_batch_data(cfg), cnn_data(cfg)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", ["none", "bn", "gn", "ln", "renorm"])
def test_small_cnn(norm):
    """The transfer runs' network (fine-tuning, AdaBN)."""
    torch.manual_seed(0)
    model = norms.SmallCNN(norm)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is None) == (norm != "none") for c in convs)
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"none": "Identity", "bn": "BatchNorm2d", "gn": "TorchGroupNorm", "ln": "TorchGroupNorm",
                "renorm": "BatchRenorm2d"}[norm]
    assert expected in kinds


def test_committed_small_batch_results_reproduce():
    """Re-run a slice of the committed grid (B = 64, BN and GN, every seed) and compare within the seed spread
    (CONTRIBUTING: max(3 sd, 0.01) for an accuracy); the file must describe the library's defaults."""
    doc = load_results("small_batch.json")
    assert doc["provenance"]["command"].startswith("python -m bnlib small-batch")
    res = doc["results"]
    assert res["config"] == norms.SmallBatchConfig().as_dict()
    assert len(res["runs"]) == len(res["config"]["norms"]) * len(res["config"]["batch_sizes"]) * 3
    cfg = norms.SmallBatchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["config"].items()})
    data = norms.small_batch_data(cfg)
    for norm in ("bn", "gn"):
        committed = [r["test_accuracy"] for r in res["runs"] if r["norm"] == norm and r["batch_size"] == 64]
        assert len(committed) == len(cfg.seeds) >= 3
        fresh = [norms.small_batch_run(norm, 64, s, data, cfg)["test_accuracy"] for s in cfg.seeds]
        tol = max(3 * np.std(committed), 0.01)
        assert abs(np.mean(fresh) - np.mean(committed)) <= tol, (norm, fresh, committed)
