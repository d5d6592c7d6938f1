"""bnlib.torch_bn modules: state_dict, repr, errors (messages taken from torch at test
time), convert_batchnorm, and training a small CNN against torch.nn.BatchNorm."""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnlib import torch_bn as tb


# every test runs on both paths of batch_norm: the speed path and the readable Function
pytestmark = pytest.mark.usefixtures("both_bn_paths")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from a seeded global generator (or from its own torch.Generator)."""
    torch.manual_seed(0)

PAIRS = [
    (tb.BatchNorm1d, nn.BatchNorm1d, (6, 3, 4)),
    (tb.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2, 3)),
    (tb.BatchNorm3d, nn.BatchNorm3d, (3, 3, 2, 2, 2)),
]
KW = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(bias=False),
    dict(eps=1e-3, momentum=0.25),
]


def _trained(cls, shape, kw, steps=3, seed=0):
    torch.manual_seed(seed)
    m = cls(3, **kw)
    for _ in range(steps):
        m(torch.randn(shape) * 2 + 1)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("mine_cls,ref_cls,shape", PAIRS)
@pytest.mark.parametrize("kw", KW, ids=str)
def test_repr_parameters_buffers_dtypes(mine_cls, ref_cls, shape, kw):
    mine, ref = mine_cls(3, **kw), ref_cls(3, **kw)
    assert repr(mine) == repr(ref)  # the class names coincide: BatchNorm{1,2,3}d
    assert type(mine).__name__ == type(ref).__name__
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in mine.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for (n, a), (_, e) in zip(mine.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e), n
    assert mine.state_dict()._metadata[""] == ref.state_dict()._metadata[""] == {"version": 2}
    assert mine.training
    for cast in ("double", "half"):
        a, e = getattr(copy.deepcopy(mine), cast)(), getattr(copy.deepcopy(ref), cast)()
        for (n, x), (_, y) in zip(a.state_dict().items(), e.state_dict().items()):
            assert x.dtype == y.dtype and x.shape == y.shape, (cast, n)
    if mine.num_batches_tracked is not None:
        assert mine.num_batches_tracked.dtype == torch.int64 and mine.num_batches_tracked.dim() == 0


@pytest.mark.parametrize("mine_cls,ref_cls,shape", PAIRS)
@pytest.mark.parametrize("kw", KW, ids=str)
def test_state_dict_round_trips_strict(mine_cls, ref_cls, shape, kw):
    x = torch.randn(shape)
    src = _trained(ref_cls, shape, kw, seed=1)
    mine = mine_cls(3, **kw)
    mine.load_state_dict(src.state_dict(), strict=True)
    src.eval(), mine.eval()
    torch.testing.assert_close(mine(x), src(x), rtol=1e-5, atol=1e-5)
    src2 = _trained(mine_cls, shape, kw, seed=2)
    ref = ref_cls(3, **kw)
    ref.load_state_dict(src2.state_dict(), strict=True)
    for (n, a), (_, e) in zip(src2.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, e), n


def test_old_checkpoints_and_strict_errors_like_torch():
    src = _trained(nn.BatchNorm2d, (4, 3, 2, 2), {})
    old = OrderedDict((k, v) for k, v in src.state_dict().items() if k != "num_batches_tracked")
    for sd in (old, _with_version(old, 1)):
        results = []
        for cls in (tb.BatchNorm2d, nn.BatchNorm2d):
            m = cls(3)
            m.num_batches_tracked.fill_(7)
            m.load_state_dict(copy.copy(sd), strict=True)
            results.append(m.num_batches_tracked.item())
        assert results == [7, 7]  # the module's current value is kept, as torch does
    _same_error(lambda cls: cls(3).load_state_dict(_with_version(old, 2), strict=True))
    _same_error(
        lambda cls: cls(3, track_running_stats=False).load_state_dict(src.state_dict(), strict=True)
    )
    m64 = _trained(nn.BatchNorm2d, (4, 3, 2, 2), {}).double()
    a, e = tb.BatchNorm2d(3), nn.BatchNorm2d(3)
    a.load_state_dict(m64.state_dict()), e.load_state_dict(m64.state_dict())
    for (n, x), (_, y) in zip(a.state_dict().items(), e.state_dict().items()):
        assert x.dtype == y.dtype and torch.equal(x, y), n


def _with_version(sd, version):
    sd = OrderedDict(sd)
    sd._metadata = OrderedDict({"": {"version": version}})
    return sd


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def _same_error(make, expect_error=True):
    """Run make(cls) for bnlib's and torch's class; same exception type and message."""
    got = _outcome(lambda: make("mine"))
    want = _outcome(lambda: make("ref"))
    assert got == want
    assert (want is not None) == expect_error, want
    return want


def _cls_of(which, kind):
    return {"mine": {1: tb.BatchNorm1d, 2: tb.BatchNorm2d, 3: tb.BatchNorm3d},
            "ref": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}[which][kind]


# _same_error passes "mine"/"ref"; wrap for classes and functions
def _mod_error(kind, x, train=True, ctor=None, **kw):
    def make(which):
        m = _cls_of(which, kind)(*(ctor or (3,)), **kw)
        m.train(train)
        m(x)
    return _same_error(make)


def _fn_error(*args, **kwargs):
    def make(which):
        fn = tb.batch_norm if which == "mine" else F.batch_norm
        a = [t.clone() if isinstance(t, torch.Tensor) and not t.requires_grad else t for t in args]
        fn(*a, **kwargs)
    return _same_error(make)


@pytest.mark.parametrize("train", [True, False])
def test_module_input_dim_errors(train):
    for kind, bad in [(1, (4,)), (1, (2, 3, 4, 5)), (2, (2, 3, 4)), (2, (2, 3, 4, 5, 6)),
                      (3, (2, 3, 4, 5)), (3, (2, 3))]:
        _mod_error(kind, torch.randn(bad), train=train)


def test_module_errors_batch_size_channels_eps():
    for kind, shape in [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]:
        _mod_error(kind, torch.randn(shape))
        _mod_error(kind, torch.randn(shape), train=False, track_running_stats=False)
    for kind, shape in [(1, (1, 3, 5)), (2, (1, 3, 2, 1))]:  # allowed
        m1, m2 = _cls_of("mine", kind)(3), _cls_of("ref", kind)(3)
        x = torch.randn(shape)
        torch.testing.assert_close(m1(x), m2(x), rtol=1e-5, atol=1e-5)
    _mod_error(2, torch.randn(4, 5, 2, 2))
    _mod_error(2, torch.randn(4, 5, 2, 2), train=False)
    _mod_error(2, torch.randn(4, 5, 2, 2), track_running_stats=False)
    _mod_error(2, torch.randn(4, 3, 2, 2), ctor=(3, 0))
    _mod_error(2, torch.randn(4, 3, 2, 2), ctor=(3, 0.0))
    _mod_error(2, torch.randn(4, 3, 2, 2), ctor=(3, -1e-3), train=False)
    _mod_error(2, torch.randn(4, 3, 2, 2).double())
    _mod_error(2, torch.randint(0, 5, (4, 3, 2, 2)))
    # no error: affine=False and untracked accept any C; eps=0 in eval; bf16 input
    for which in ("mine", "ref"):
        _cls_of(which, 2)(3, affine=False, track_running_stats=False)(torch.randn(4, 5, 2, 2))
        _cls_of(which, 2)(3, eps=0).eval()(torch.randn(4, 3, 2, 2))


def test_functional_errors():
    x = torch.randn(4, 3, 2)
    rm, rv, w, b = torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)
    _fn_error(x, None, None, w, b, False)
    _fn_error(x, rm, None, w, b, False)
    _fn_error(x, rm, None, w, b, True)
    _fn_error(x, None, rv, None, None, True)
    _fn_error(torch.randn(4, 5), rm, rv, w, b, True)
    _fn_error(torch.randn(4, 5), None, None, w, b, True)
    _fn_error(torch.randn(4, 5), None, None, None, b, True)
    _fn_error(torch.randn(7), rm, rv, w, b, False)
    _fn_error(torch.randn(1, 3), rm, rv, w, b, True)
    _fn_error(x, rm, rv, w, b, True, 0.1, 0.0)
    _fn_error(x, rm, rv, w, b, True, 0.1, 0)
    _fn_error(x, rm, rv, w, b, False, 0.1, -1e-3)
    _fn_error(x, rm, rv, w, b, True, None)
    _fn_error(x, rm.clone().requires_grad_(), rv, w, b, True)
    _fn_error(x, rm, rv.clone().requires_grad_(), w, b, False)
    _fn_error(x.double(), rm, rv, w, b, True)
    _fn_error(x.double(), None, None, w, b, True)
    _fn_error(x, rm.double(), rv.double(), None, None, True)
    _fn_error(x, rm, rv.double(), None, None, True)
    _fn_error(x, rm, rv, w.double(), b, True)
    _fn_error(x, rm, rv, w, b.double(), True)
    _fn_error(x.bfloat16(), rm, rv, w.bfloat16(), b, True)
    _fn_error(x.bfloat16(), rm.bfloat16(), rv.bfloat16(), w, b, True)
    _fn_error(torch.randint(0, 4, (4, 3)), rm, rv, w, b, True)
    _fn_error(torch.randint(0, 4, (4, 3)).to(torch.complex64), rm, rv, w, b, True)


def test_forward_ad_on_running_stats_rejected_like_torch():
    import torch.autograd.forward_ad as fwAD

    for training in (True, False):
        for dual_x in (True, False):
            outs = []
            for fn in (tb.batch_norm, F.batch_norm):
                with fwAD.dual_level():
                    rm = fwAD.make_dual(torch.zeros(3), torch.ones(3))
                    x = torch.randn(4, 3)
                    if dual_x:
                        x = fwAD.make_dual(x, torch.ones(4, 3))
                    outs.append(_outcome(lambda: fn(x, rm, torch.ones(3), training=training)))
            assert outs[0] == outs[1]
            assert (outs[1] is not None) == (dual_x and not training)


# ------------------------------------------------------------------ convert + training
class SmallCNN(nn.Module):
    """conv32-conv64-fc128 with BatchNorm, MNIST-sized input (N, 1, 28, 28)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64, momentum=None), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 7 * 7, 128, bias=False)
        self.bn_fc = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc2(F.relu(self.bn_fc(self.fc1(x))))


def _bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_batchnorm_round_trip():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(8, 1, 28, 28)
    model(x)  # some running statistics
    model.eval()
    ref_out = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    bufs_before = {n: b.clone() for n, b in model.named_buffers()}
    conv = tb.convert_batchnorm(model)
    assert conv is model
    assert _bn_types(conv) == [tb.BatchNorm2d, tb.BatchNorm2d, tb.BatchNorm1d]
    for n, p in conv.named_parameters():
        assert p is params_before[n]  # same Parameter objects (optimisers keep working)
    assert not any(m.training for m in conv.modules())
    assert conv.features[5].momentum is None and conv.features[1].eps == 1e-5
    torch.testing.assert_close(conv(x), ref_out, rtol=1e-5, atol=1e-5)
    for n, b in conv.named_buffers():
        assert torch.equal(b, bufs_before[n]), n
    back = tb.convert_batchnorm(conv, to="torch")
    assert _bn_types(back) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert torch.equal(back(x), ref_out)  # torch modules again: identical outputs
    single = tb.convert_batchnorm(nn.BatchNorm3d(4, affine=False).double())
    assert type(single) is tb.BatchNorm3d and single.running_mean.dtype == torch.float64
    assert repr(single) == repr(nn.BatchNorm3d(4, affine=False))
    assert tb.convert_batchnorm(nn.BatchNorm2d(2, bias=False)).bias is None
    with pytest.raises(ValueError):
        tb.convert_batchnorm(model, to="numpy")


def _train_small_cnn(model, dtype):
    """Four SGD steps (lr 0.01, momentum 0.9) on seeded batches, then eval-mode outputs on a fresh batch.
    Returns (state_dict, outputs).  (With a large learning rate float32 training is chaotic: a single
    ReLU/max-pool flip caused by a 1e-7 difference jumps to 1e-4, hence the moderate lr.)"""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(16, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        t = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    model.eval()
    x = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        return model.state_dict(), model(x)


def test_training_small_cnn_matches_torch_float64():
    """A few SGD steps from the same weights on the same batches, in float64: bnlib = torch to 1e-10."""
    torch.manual_seed(0)
    ref = SmallCNN().double()
    mine = tb.convert_batchnorm(copy.deepcopy(ref))
    assert _bn_types(mine) == [tb.BatchNorm2d, tb.BatchNorm2d, tb.BatchNorm1d]
    (sd_ref, out_ref), (sd_mine, out_mine) = _train_small_cnn(ref, torch.float64), _train_small_cnn(mine, torch.float64)
    for n in sd_ref:
        torch.testing.assert_close(sd_mine[n], sd_ref[n], rtol=1e-10, atol=1e-10, msg=n)
    torch.testing.assert_close(out_mine, out_ref, rtol=1e-10, atol=1e-10)


def test_training_small_cnn_float32_error_within_torchs_own():
    """The same four steps in float32.  Two float32 implementations differ by rounding that depends on the
    CPU's kernels, so neither is compared with the other: each is compared with a float64 run of the same
    network, and bnlib's error must stay within 4x torch's own error (+ a few float32 ulps of the value)."""
    torch.manual_seed(0)
    net = SmallCNN()
    sd64, out64 = _train_small_cnn(copy.deepcopy(net).double(), torch.float64)
    sd_torch, out_torch = _train_small_cnn(copy.deepcopy(net), torch.float32)
    mine = tb.convert_batchnorm(copy.deepcopy(net))
    assert _bn_types(mine) == [tb.BatchNorm2d, tb.BatchNorm2d, tb.BatchNorm1d]
    sd_mine, out_mine = _train_small_cnn(mine, torch.float32)
    pairs = [(n, sd_mine[n], sd_torch[n], sd64[n]) for n in sd64] + [("eval output", out_mine, out_torch, out64)]
    for n, a, t, r in pairs:
        if not r.is_floating_point():  # num_batches_tracked
            assert torch.equal(a, t) and torch.equal(t, r), n
            continue
        err_mine = (a.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        # float32 rounding of the quantity: relative to its own size, and for a mean, to the spread of the
        # values it averages (torch accumulates batch means in float64 on CPU, bnlib in float32)
        scale = r.abs().max().item()
        if n.endswith("running_mean"):
            scale = max(scale, sd64[n.replace("running_mean", "running_var")].sqrt().max().item())
        ulp = torch.finfo(torch.float32).eps * scale
        assert err_mine <= 4 * err_torch + 4 * ulp, (n, err_mine, err_torch)


def test_subclasses_of_torch_classes_and_conv_bn_fusion():
    """bnlib's modules are torch's classes (isinstance), so tools that look for batch norm by class see
    them; torch.nn.utils.fusion.fuse_conv_bn_eval folds a trained bnlib BN into the convolution."""
    for mine, ref in ((tb.BatchNorm1d, nn.BatchNorm1d), (tb.BatchNorm2d, nn.BatchNorm2d),
                      (tb.BatchNorm3d, nn.BatchNorm3d)):
        assert isinstance(mine(3), ref) and issubclass(mine, nn.modules.batchnorm._BatchNorm)
        assert mine.forward is not ref.forward
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    bn = tb.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g), bn.bias.normal_(generator=g)
    for _ in range(3):  # running statistics away from (0, 1)
        bn(conv(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 1))
    conv.eval(), bn.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=0, atol=1e-12)


def test_convert_counts_by_exact_class_as_chapter_6_does():
    """Chapter 6 counts converted layers with isinstance(m, bnlib's class) and torch's left with
    type(m) is torch's class: a subclass must not count as torch's."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm2d(2)))
    conv = tb.convert_batchnorm(model)
    assert sum(isinstance(m, tb.BatchNorm2d) for m in conv.modules()) == 2
    assert sum(type(m) is nn.BatchNorm2d for m in conv.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in conv.modules()) == 2  # they are torch's class too
    back = tb.convert_batchnorm(conv, to="torch")
    assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == 2
    assert tb.convert_batchnorm(tb.convert_batchnorm(nn.BatchNorm1d(3))).__class__ is tb.BatchNorm1d  # idempotent
