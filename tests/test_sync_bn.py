"""bnlib.sync_bn: SyncBatchNorm in real gloo process groups (2 and 3 processes) equals one-process batch norm.

Expected values come from torch's own ``F.batch_norm`` (and autograd through it) on the concatenated batch, in
float64, in this process.  One group of 3 processes, started once for the module, runs every multi-process case
(a spawn costs seconds, more on a busy machine; the cases take milliseconds): the 3-rank cases on the world, the
2-rank ones on the subgroup of ranks 0 and 1.  Worker functions are module-level: spawn pickles them by name.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from bnlib import torch_bn
from bnlib.ddp import launch, parity_inputs, sync_bn_outputs
from bnlib.sync_bn import (SyncBatchNorm, SyncBatchNormFunction, convert_sync_batchnorm, local_stats, merge_stats,
                           record_collectives, sync_batch_norm)

TOL = 1e-10

# (per-rank batch sizes, trailing dims): equal, unequal, a rank with 0 examples, a rank with 1 value per channel
CASES_2 = [([8, 8], ()), ([5, 11], (3, 2)), ([0, 7], (4,)), ([1, 6], ()), ([3, 3], (2, 2, 2))]
CASES_3 = [([4, 4, 4], (3, 3)), ([3, 0, 9], ()), ([6, 2, 1], (5,)), ([0, 0, 5], (2, 2))]


def _reference(inputs, momentum=0.1):
    """torch's F.batch_norm + autograd on the concatenated batch, step after step, with its own buffers."""
    C = inputs["weight"].shape[0]
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    out = {"y": [], "dx": [], "dgamma": [], "dbeta": []}
    for x, dy in zip(inputs["x"], inputs["dy"]):
        x = x.clone().requires_grad_(True)
        w, b = inputs["weight"].clone().requires_grad_(True), inputs["bias"].clone().requires_grad_(True)
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=1e-5)
        (y * dy).sum().backward()
        out["y"].append(y.detach()), out["dx"].append(x.grad)
        out["dgamma"].append(w.grad), out["dbeta"].append(b.grad)
    out.update(running_mean=rm, running_var=rv)
    return out


def _parity_worker(rank, world_size, cases, group=None):
    return [sync_bn_outputs(rank, world_size, parity_inputs(sizes, tail, seed=k), group=group)
            for k, (sizes, tail) in enumerate(cases)]


def _worker(rank, world_size):
    """Everything, in one group of 3 processes (a spawn costs seconds, tens of seconds on a busy machine):
    the 3-rank parity cases on the world, then the 2-rank checks on the subgroup of ranks 0 and 1."""
    pair = dist.new_group([0, 1])  # every rank calls new_group for every group
    first = dist.new_group([0])
    out = {"parity3": _parity_worker(rank, world_size, CASES_3)}
    if rank < 2:
        out["parity2"] = _parity_worker(rank, 2, CASES_2, pair)
        out["grad"] = _grad_worker(rank, 2, pair, first)
        out["errors"] = _error_worker(rank, 2, pair)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def group_results():
    """The results of :func:`_worker` on ranks 0, 1 and 2 (one spawn for the whole module)."""
    return launch(_worker, 3, timeout=120)


def _grad_worker(rank, world_size, group, sub):
    """gradcheck in the one-rank subgroup ``sub`` (rank 0), then a directional-derivative check across ``group``."""
    out = {}
    g = torch.Generator().manual_seed(5)
    if rank == 0:
        x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
        w = torch.rand(2, generator=g, dtype=torch.float64).add(0.5).requires_grad_(True)
        b = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_(True)
        out["gradcheck"] = torch.autograd.gradcheck(
            lambda x, w, b: SyncBatchNormFunction.apply(x, w, b, 1e-5, sub)[0], (x, w, b))
    # all ranks: d/dh <u, f(x + h v)> at h = 0, numerically (central differences) and by backward
    inp = parity_inputs([3, 5, 2][:world_size], (2,), seed=9, steps=1)
    sizes = inp["sizes"]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x, u = inp["x"][0][lo:hi], inp["dy"][0][lo:hi]
    vx = torch.randn(inp["x"][0].shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)[lo:hi]
    vw, vb = torch.tensor([0.3, -0.7, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    w, b = inp["weight"], inp["bias"]

    def f(h):
        with torch.no_grad():
            return SyncBatchNormFunction.apply(x + h * vx, w + h * vw, b + h * vb, 1e-5, group)[0]

    h = 1e-5
    numeric = torch.tensor([(u * (f(h) - f(-h))).sum() / (2 * h)])
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = SyncBatchNormFunction.apply(xg, wg, bg, 1e-5, group)[0]
    (y * u).sum().backward()
    analytic = torch.tensor([(xg.grad * vx).sum() + (wg.grad * vw).sum() + (bg.grad * vb).sum()])
    dist.all_reduce(numeric, group=group), dist.all_reduce(analytic, group=group)
    out["directional"] = (float(numeric), float(analytic))
    return out


def _check_parity(cases, results):
    worst = 0.0
    for k, (sizes, tail) in enumerate(cases):
        inputs = parity_inputs(sizes, tail, seed=k)
        ref = _reference(inputs)
        ranks = [res[k] for res in results]
        for step in range(len(inputs["x"])):
            for key in ("y", "dx"):
                got = torch.cat([r[key][step] for r in ranks])
                worst = max(worst, float((got - ref[key][step]).abs().max()))
                assert torch.allclose(got, ref[key][step], rtol=0, atol=TOL), (sizes, tail, step, key)
            for key in ("dgamma", "dbeta"):  # local sums; their sum over ranks is the gradient (DDP sums them)
                got = sum(r[key][step] for r in ranks)
                assert torch.allclose(got, ref[key][step], rtol=0, atol=TOL), (sizes, tail, step, key)
        for r in ranks:  # every rank holds the running statistics of the concatenated batch
            for key in ("running_mean", "running_var"):
                assert torch.allclose(r[key], ref[key], rtol=0, atol=TOL), (sizes, tail, key)
            assert r["num_batches_tracked"] == len(inputs["x"])
            # every rank merges the same packets in the same order: the same bits
            assert torch.equal(r["running_mean"], ranks[0]["running_mean"])
            assert torch.equal(r["running_var"], ranks[0]["running_var"])
    return worst


def test_two_processes_equal_one_batch(group_results):
    results = [r["parity2"] for r in group_results[:2]]
    assert 0 < _check_parity(CASES_2, results) < TOL


def test_three_processes_equal_one_batch(group_results):
    results = [r["parity3"] for r in group_results]
    assert 0 < _check_parity(CASES_3, results) < TOL


def test_gradcheck_and_directional_derivative_across_ranks(group_results):
    results = [r["grad"] for r in group_results[:2]]
    assert results[0]["gradcheck"] is True
    numeric, analytic = results[0]["directional"]
    assert results[1]["directional"] == (numeric, analytic)  # all-reduced: the same on every rank
    assert abs(numeric - analytic) < 1e-7 * abs(analytic), (numeric, analytic)
    # a wrong backward would be far off: the derivative is not small
    assert abs(analytic) > 1e-2


def _error_worker(rank, world_size, group):
    """Ranks that disagree (in ``group``): each scenario's error, as (type name, message), on every rank; then,
    with the group's timeout set to 1 s, a rank that skips a collective (this leaves the group unusable)."""
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as e:  # the errors are the point of the test
            out[name] = (type(e).__name__, str(e))

    g = torch.Generator().manual_seed(rank)
    # C differs: rank 0 has 3 channels, rank 1 has 4
    attempt("channels", lambda: SyncBatchNorm(3 + rank, process_group=group)(torch.randn(4, 3 + rank, generator=g)))
    # dtype differs: float64 on rank 0, float32 on rank 1
    dtype = torch.float64 if rank == 0 else torch.float32
    attempt("dtype", lambda: SyncBatchNorm(3, process_group=group).to(dtype)(torch.randn(4, 3, generator=g).to(dtype)))
    # one value per channel over all ranks: rank 0 has one example, rank 1 none
    attempt("one_value", lambda: SyncBatchNorm(3, process_group=group)(torch.randn(1 - rank, 3, generator=g)))
    # the group still works after these errors
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    out["after"] = float(t)
    # a rank that does not take part (eval mode on rank 1): rank 0 times out instead of hanging
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=1), group)  # torch's own setter
    bn = SyncBatchNorm(3, process_group=group).train(rank == 0)
    t0 = time.perf_counter()
    if rank == 0:
        attempt("skipped", lambda: bn(torch.randn(4, 3, generator=g)))
        out["seconds"] = time.perf_counter() - t0
    else:
        bn(torch.randn(4, 3, generator=g))
        time.sleep(2.5)  # stay alive past rank 0's timeout
    return out


def test_disagreeing_ranks_raise_instead_of_hanging(group_results):
    results = [r["errors"] for r in group_results[:2]]
    for r, res in enumerate(results):
        kind, msg = res["channels"]
        assert kind == "RuntimeError" and "disagree on the number of channels" in msg
        assert "rank 0: C=3 (num_features=3)" in msg and "rank 1: C=4 (num_features=4)" in msg
        kind, msg = res["dtype"]
        assert kind == "RuntimeError" and "rank 0: torch.float64, rank 1: torch.float32" in msg
        kind, msg = res["one_value"]
        assert kind == "ValueError" and msg.startswith("Expected more than 1 value per channel when training, got 1")
        assert res["after"] == 2.0
    kind, msg = results[0]["skipped"]
    assert kind == "RuntimeError", msg
    assert 0.9 < results[0]["seconds"] < 10


# ------------------------------------------------------------------------------ without a process group
def test_outside_a_process_group_is_plain_batch_norm():
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) + 2).requires_grad_(True)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ours, theirs = SyncBatchNorm(4).double(), torch.nn.BatchNorm2d(4).double()
    x2 = x.detach().clone().requires_grad_(True)
    for _ in range(2):
        (ours(x) * dy).sum().backward()
        (theirs(x2) * dy).sum().backward()
    assert torch.allclose(ours(x), theirs(x2), atol=1e-12, rtol=0)
    assert torch.allclose(x.grad, x2.grad, atol=1e-12, rtol=0)
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, atol=1e-12, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).double(), getattr(theirs, name).double(), atol=1e-12, rtol=0)
    ours.eval(), theirs.eval()
    assert torch.allclose(ours(x), theirs(x2), atol=1e-12, rtol=0)
    # no process group: the functional form is bnlib's batch_norm, one value per channel is torch's error
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync_batch_norm(torch.randn(1, 3), None, None, training=True)


def test_module_has_torchs_interface():
    ours, theirs = SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False), torch.nn.SyncBatchNorm(5, 1e-3, None, False)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, torch.nn.SyncBatchNorm)  # DistributedDataParallel refuses that class on CPU
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for bad, msg in ((torch.randn(3), "expected at least 2D input (got 1D input)"),
                     (torch.randn(3, 0), "SyncBatchNorm number of input channels should be non-zero")):
        for m in (ours, theirs):
            with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                m(bad)


@pytest.mark.parametrize("bn_module", [torch.nn, torch_bn])
def test_convert_sync_batchnorm(bn_module):
    from bnlib.models import SeedCNN

    model = SeedCNN(bn=True, bn_layer=bn_module.BatchNorm1d, bn2d_layer=bn_module.BatchNorm2d).eval()
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    out = convert_sync_batchnorm(model)
    assert out is model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(type(m) is SyncBatchNorm and not m.training for m in norms)
    assert [m.num_features for m in norms] == [32, 64, 128]
    assert all(p is before[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert all(b is buffers[n] for n, b in model.named_buffers())
    single = convert_sync_batchnorm(bn_module.BatchNorm2d(7))
    assert type(single) is SyncBatchNorm and single.num_features == 7
    assert SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(2)).__class__ is SyncBatchNorm


# ------------------------------------------------------------------------------ the merge, in one process
def test_merge_stats_equals_statistics_of_the_union():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 4, 5, generator=g, dtype=torch.float64) * 3 + 100 for n in (7, 0, 2, 11)]
    stats = [local_stats(p) for p in parts]
    m, mu, m2 = merge_stats(torch.tensor([s[0] for s in stats]), torch.stack([s[1] for s in stats]),
                            torch.stack([s[2] for s in stats]))
    whole = torch.cat(parts)
    assert int(m) == 20 * 5
    assert torch.allclose(mu, whole.mean((0, 2)), atol=1e-12, rtol=0)
    assert torch.allclose(m2 / m, whole.var((0, 2), correction=0), atol=1e-11, rtol=0)


def test_merge_does_not_cancel_in_float32():
    """|mu| = 1e4 sigma: the merge keeps var to float32 rounding (1e-7); sum x^2 / m - mu^2 loses it all."""
    g = torch.Generator().manual_seed(4)
    whole64 = torch.randn(4096, 2, generator=g, dtype=torch.float64) + 1e4
    parts = [p.float() for p in whole64.split([1000, 3096])]
    var_ref = torch.cat(parts).double().var(0, correction=0)
    stats = [local_stats(p) for p in parts]
    m, mu, m2 = merge_stats(torch.tensor([s[0] for s in stats]), torch.stack([s[1] for s in stats]),
                            torch.stack([s[2] for s in stats]))
    merged_err = float(((m2 / m).double() - var_ref).abs().max() / var_ref.max())
    sums = [(p.sum(0), p.square().sum(0)) for p in parts]
    s1, s2 = sum(s[0] for s in sums), sum(s[1] for s in sums)
    naive_err = float(((s2 / 4096 - (s1 / 4096) ** 2).double() - var_ref).abs().max() / var_ref.max())
    assert merged_err < 1e-6 and naive_err > 0.5, (merged_err, naive_err)


def test_record_collectives_is_empty_outside_a_group():
    with record_collectives() as log:
        SyncBatchNorm(3)(torch.randn(5, 3))
    assert log == []
