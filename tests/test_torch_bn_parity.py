"""bnlib.torch_bn against torch.nn.BatchNorm*d / F.batch_norm: values, grads, buffers,
float32 numerics, memory formats, saved memory.  Expected values always come from torch
(or from torch in float64 as the 'exact' reference)."""

import pytest
import torch
import torch.nn.functional as F

from bnlib import torch_bn as tb


# every test runs on both paths of batch_norm: the speed path and the readable Function
pytestmark = pytest.mark.usefixtures("both_bn_paths")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from a seeded global generator as well as its own torch.Generator."""
    torch.manual_seed(0)

PAIRS = {
    1: (tb.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (tb.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (tb.BatchNorm3d, torch.nn.BatchNorm3d),
}
SHAPES = {1: [(6, 4), (5, 4, 3)], 2: [(3, 4, 3, 2)], 3: [(2, 4, 2, 3, 2)]}


def _pair(kind, dtype=torch.float64, C=4, **kw):
    mine_cls, ref_cls = PAIRS[kind]
    ref = ref_cls(C, dtype=dtype, **kw)
    mine = mine_cls(C, dtype=dtype, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.normal_()
    mine.load_state_dict(ref.state_dict())
    return mine, ref


def _step(m, x, dy):
    x = x.clone().requires_grad_()
    y = m(x)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(y, [x] + params, dy)
    return [y.detach()] + list(grads)


def _assert_state_equal(mine, ref, atol):
    s1, s2 = mine.state_dict(), ref.state_dict()
    assert list(s1) == list(s2)
    for k in s2:
        assert s1[k].dtype == s2[k].dtype and s1[k].shape == s2[k].shape, k
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=atol)


CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.0),
    dict(momentum=1.0),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(bias=False),
    dict(eps=1e-2, momentum=0.3),
]


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_float64_parity_over_steps(kind, cfg):
    g = torch.Generator().manual_seed(kind)
    for shape in SHAPES[kind]:
        mine, ref = _pair(kind, **cfg)
        for step in range(5):
            if step == 3:
                mine.eval(), ref.eval()
            x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
            dy = torch.randn(shape, generator=g, dtype=torch.float64)
            for a, e in zip(_step(mine, x, dy), _step(ref, x, dy)):
                torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
            _assert_state_equal(mine, ref, atol=1e-12)


def test_track_running_stats_flipped_after_construction():
    mine, ref = _pair(2)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    mine(x), ref(x)
    for m in (mine, ref):
        m.track_running_stats = False
    for mode in ("train", "eval"):
        for m in (mine, ref):
            getattr(m, mode)()
        torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=1e-10)
        _assert_state_equal(mine, ref, atol=1e-12)


def test_momentum_changed_to_none_after_training_uses_current_nbt():
    mine, ref = _pair(1)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:
            mine.momentum = ref.momentum = None
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=1e-10)
        _assert_state_equal(mine, ref, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_functional_in_place_update_and_no_grad(training):
    x = torch.randn(6, 3, 5, dtype=torch.float64) + 1
    rm1, rv1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    p1, p2 = rm1.data_ptr(), rv1.data_ptr()
    with torch.no_grad():
        y1 = tb.batch_norm(x, rm1, rv1, training=training, momentum=0.2)
        y2 = F.batch_norm(x, rm2, rv2, training=training, momentum=0.2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(rm1, rm2, rtol=0, atol=1e-14)
    torch.testing.assert_close(rv1, rv2, rtol=0, atol=1e-14)
    assert (rm1.data_ptr(), rv1.data_ptr()) == (p1, p2)
    with torch.inference_mode():
        tb.batch_norm(x, rm1, rv1, training=True)
        F.batch_norm(x, rm2, rv2, training=True)
    torch.testing.assert_close(rm1, rm2, rtol=0, atol=1e-14)


def test_empty_batch_and_constant_channel():
    for shape in [(0, 3, 4, 4), (5, 3, 0)]:
        kind = len(shape) - 2
        mine_cls, ref_cls = PAIRS[kind]
        mine, ref = mine_cls(3), ref_cls(3)
        x = torch.randn(shape, requires_grad=True)
        y1, y2 = mine(x), ref(x)
        assert y1.shape == y2.shape == shape
        y1.sum().backward()
        assert torch.equal(mine.weight.grad, torch.zeros(3))
        _assert_state_equal(mine, ref, atol=0)
    # constant channel: finite grads; torch's x*alpha+beta gives b + O(ulp), ours exactly b
    x = torch.full((4, 2, 3, 3), 3.0, dtype=torch.float64)
    x[:, 1] = torch.randn(4, 3, 3, dtype=torch.float64)
    dy = torch.randn_like(x)
    mine, ref = _pair(2)
    mine2, ref2 = tb.BatchNorm2d(2).double(), torch.nn.BatchNorm2d(2).double()
    for a, e in zip(_step(mine2, x, dy), _step(ref2, x, dy)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- float32
def _run_f(fn, x, w, b, dy, training=True):
    x = x.clone().requires_grad_()
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
    if not training:
        rm, rv = torch.randn(C, dtype=x.dtype) + x.mean().item(), torch.rand(C, dtype=x.dtype) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    return [y.detach(), gx, gw, gb, rm, rv], (rm0, rv0)


F32_CASES = [
    ("N(0,1)", (64, 32, 8, 8), 1.0, 0.0),
    ("3N+10", (64, 32, 8, 8), 3.0, 10.0),
    ("N+100", (64, 32, 8, 8), 1.0, 100.0),
    ("N+100 2D", (1024, 64), 1.0, 100.0),
    ("2N-5 3D", (32, 16, 64), 2.0, -5.0),
]


@pytest.mark.parametrize("name,shape,scale,offset", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_float32_parity_and_accuracy(name, shape, scale, offset):
    """float32 results agree with torch's float32 kernel within ~1e-5 (relative to the
    magnitude of each quantity) and are at least as close to the float64 'exact'
    result as torch's own float32 output is (times 2, plus a tiny slack)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * scale + offset
    C = shape[1]
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g)
    dy = torch.randn(shape, generator=g)
    mine, _ = _run_f(tb.batch_norm, x, w, b, dy)
    ref, _ = _run_f(F.batch_norm, x, w, b, dy)
    exact, _ = _run_f(F.batch_norm, x.double(), w.double(), b.double(), dy.double())
    names = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"]
    for n, a, r, e in zip(names, mine, ref, exact):
        s = max(1.0, e.abs().max().item())
        assert a.dtype == torch.float32
        diff = (a.double() - r.double()).abs().max().item() / s
        assert diff < 1e-5 * max(1.0, offset / 10), (n, diff)
        err_mine = (a.double() - e).abs().max().item() / s
        err_torch = (r.double() - e).abs().max().item() / s
        assert err_mine <= 2 * err_torch + 1e-6, (n, err_mine, err_torch)


def test_float32_eval_parity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn((16, 8, 5, 5), generator=g) + 100
    w, b, dy = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g), torch.randn(16, 8, 5, 5, generator=g)
    torch.manual_seed(0)
    mine, _ = _run_f(tb.batch_norm, x, w, b, dy, training=False)
    torch.manual_seed(0)
    ref, _ = _run_f(F.batch_norm, x, w, b, dy, training=False)
    for a, r in zip(mine, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_and_non_contiguous(training):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 6, 5, 7, generator=g) + 3
    dy = torch.randn(8, 6, 5, 7, generator=g)
    variants = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": torch.randn(8, 12, 5, 7, generator=g)[:, ::2] + 3,
        "permuted": base.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
        "3d channels_last": torch.randn(4, 6, 3, 4, 5, generator=g).contiguous(
            memory_format=torch.channels_last_3d
        ),
    }
    for name, x in variants.items():
        kind = x.dim() - 2
        mine, ref = _pair(kind, dtype=torch.float32, C=6)
        mine.train(training), ref.train(training)
        d = dy if x.shape == dy.shape else torch.randn(x.shape, generator=g)
        x1 = x.detach().requires_grad_()
        x2 = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y1, y2 = mine(x1), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5, msg=name)
        # Layout: a dense input in some other permutation ("permuted") keeps it in bnlib (elementwise ops
        # preserve strides), torch makes it contiguous; the values are the same.
        for fmt in (torch.channels_last, torch.channels_last_3d, torch.contiguous_format):
            if name != "permuted" and y2.dim() == (
                4 if fmt is torch.channels_last else 5 if fmt is torch.channels_last_3d else y2.dim()
            ):
                assert y1.is_contiguous(memory_format=fmt) == y2.is_contiguous(memory_format=fmt), (name, fmt)
        # dy in y's layout, as layout-preserving ops downstream deliver it (and as upstream
        # test_modules.py::test_memory_format does).  bnlib's dx follows dy's layout, torch's follows x's:
        # they differ only for a dy whose layout differs from x's (values equal, checked below).
        (g1c,) = torch.autograd.grad(y1, x1, d, retain_graph=True)
        (g2c,) = torch.autograd.grad(y2, x2, d, retain_graph=True)
        torch.testing.assert_close(g1c, g2c, rtol=1e-5, atol=1e-5, msg=name)
        d = torch.empty_like(y2).copy_(d)
        (g1,) = torch.autograd.grad(y1, x1, d)
        (g2,) = torch.autograd.grad(y2, x2, d)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5, msg=name)
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if (fmt is torch.channels_last) == (x.dim() == 4):
                assert g1.is_contiguous(memory_format=fmt) == g2.is_contiguous(memory_format=fmt)
        _assert_state_equal(mine, ref, atol=1e-6)


def low_precision_errors(dtype, seed):
    """bnlib's and torch's errors for a half input into a float32 module (torch's "mixed" case).

    Both are compared with a float64 computation from the *same* rounded input, dy and parameters, so
    what is left is each implementation's own rounding: the output and dx are rounded to ``dtype`` at
    the end (half an ulp of ``dtype``), the statistics and parameter gradients are float32 sums.
    Returns {name: (bnlib error, torch error, rounding floor)}, errors as max |difference|.
    """
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(8, 4, 5, 5, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(8, 4, 5, 5, generator=g).to(dtype)
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    results = []
    for cls, dt, xx, dyy in ((tb.BatchNorm2d, torch.float32, x, dy), (torch.nn.BatchNorm2d, torch.float32, x, dy),
                             (torch.nn.BatchNorm2d, torch.float64, x.double(), dy.double())):
        m = cls(4, dtype=dt)
        with torch.no_grad():
            m.weight.copy_(w), m.bias.copy_(b)
        xx = xx.clone().requires_grad_()
        y = m(xx)
        y.backward(dyy)
        results.append({"y": y, "dx": xx.grad, "dgamma": m.weight.grad, "dbeta": m.bias.grad,
                        "running_mean": m.running_mean, "running_var": m.running_var})
    mine, ref, exact = results
    assert mine["y"].dtype == mine["dx"].dtype == dtype and mine["dgamma"].dtype == torch.float32
    out = {}
    for k, e in exact.items():
        # one ulp of the result's dtype at the largest magnitude, and float32 sums of m = 200 terms
        floor = torch.finfo(mine[k].dtype).eps * e.abs().max().item() * (1 if mine[k].dtype == dtype else 16)
        out[k] = ((mine[k].double() - e).abs().max().item(), (ref[k].double() - e).abs().max().item(), floor)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_input_with_float32_module(dtype, seed):
    """bnlib computes a half input in float32 like torch: its error against float64 is at most twice
    torch's plus one rounding step (tools: ``low_precision_errors`` run under 40 seeds, see the report)."""
    for k, (err_mine, err_torch, floor) in low_precision_errors(dtype, seed).items():
        assert err_mine <= 2 * err_torch + floor, (k, err_mine, err_torch, floor)


def test_saved_for_backward_is_one_input_plus_channel_vectors():
    """Memory kept for backward: x itself (no copy) and O(C) vectors only."""
    x = torch.randn(16, 32, 12, 12, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    b = torch.zeros(32, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for training in (True, False):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tb.batch_norm(x, torch.zeros(32), torch.ones(32), w, b, training)
        assert x.untyped_storage().data_ptr() in storages  # x saved by reference
        small = sum(v for k, v in storages.items() if k != x.untyped_storage().data_ptr())
        assert small <= 8 * 32 * 4


def test_output_is_new_tensor_and_dtype_preserved():
    x = torch.randn(4, 3, 2, 2)
    y = tb.BatchNorm2d(3)(x)
    assert y.data_ptr() != x.data_ptr() and y.dtype == x.dtype
    assert y.grad_fn is not None and "BatchNormFunction" in type(y.grad_fn).__name__
