"""Checkers for the exercises of chapters/08_small_batches.ipynb (normalising when the batch is small).

- :func:`check_group_norm`: a reader's NumPy ``group_norm(x, num_groups, gamma, beta, eps) -> y`` for ``x`` of
  shape (N, C, *S), with the semantics of ``torch.nn.functional.group_norm``.
- :func:`check_adapt_bn`: a reader's ``adapt_bn(model, x, batch_size) -> None`` (AdaBN) that re-estimates
  every BatchNorm layer's running statistics on new data ``x``, in place, weights untouched.

The references are torch's own (``F.group_norm`` in float64; for AdaBN torch's BatchNorm with cumulative
averaging over the batches of ``x``).

Defined in: chapters/08_small_batches.ipynb
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.exercises.harness import Case, Diagnosis, Mistake, run

__all__ = ["reference_group_norm", "check_group_norm", "reference_adapt_bn", "check_adapt_bn"]


# ----------------------------------------------------------------------------------------------------
# group norm
# ----------------------------------------------------------------------------------------------------

def reference_group_norm(x, num_groups, gamma, beta, eps=1e-5):
    """torch's F.group_norm on float64 NumPy arrays: the reference."""
    y = F.group_norm(torch.from_numpy(x), num_groups, torch.from_numpy(gamma), torch.from_numpy(beta), eps)
    return y.numpy()


def _std(v, axes, eps, ddof=0, eps_outside=False):
    mu = v.mean(axis=axes, keepdims=True)
    var = v.var(axis=axes, keepdims=True, ddof=ddof)
    return (v - mu) / (np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps))


def _grouped(x, G, eps, **kw):
    """x_hat with statistics over each (example, group of C/G consecutive channels)."""
    N = x.shape[0]
    v = x.reshape(N, G, -1)
    return _std(v, 2, eps, **kw).reshape(x.shape)


def _affine(x_hat, gamma, beta):
    shape = (1, -1) + (1,) * (x_hat.ndim - 2)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape)


def _interleaved(x, G, eps):
    """Channels c and c + G in the same group (reshape (N, C/G, G, ...) instead of (N, G, C/G, ...))."""
    N, C = x.shape[:2]
    v = x.reshape(N, C // G, G, -1)
    return _std(v, (1, 3), eps).reshape(x.shape)


def _batch_groups(x, G, eps):
    """Statistics of each group pooled over the whole batch too (batch norm of the groups)."""
    N = x.shape[0]
    v = x.reshape(N, G, -1)
    return _std(v, (0, 2), eps).reshape(x.shape)


def _gn_mistakes(case: Case):
    x, G, gamma, beta, eps = case.args
    C = x.shape[1]
    spatial = tuple(range(2, x.ndim))
    table = [
        Mistake("statistics per (example, channel), over the spatial axes only: that is instance norm "
                "(group norm with G = C); pool the C/G channels of a group as well",
                lambda c: _affine(_std(x, spatial, eps), gamma, beta) if spatial and G != C else None),
        Mistake("statistics over all channels of an example: that is layer norm (group norm with G = 1); "
                "split the channels into num_groups groups first",
                lambda c: _affine(_std(x, tuple(range(1, x.ndim)), eps), gamma, beta) if G != 1 else None),
        Mistake("channels grouped by c % G (x.reshape(N, C // G, G, ...)): a group is C/G *consecutive* "
                "channels, x.reshape(N, G, C // G, ...)",
                lambda c: _affine(_interleaved(x, G, eps), gamma, beta) if 1 < G < C else None),
        Mistake("the group statistics are pooled over the batch (axis 0) too: group norm normalises each "
                "example on its own, so its output does not depend on the other examples",
                lambda c: _affine(_batch_groups(x, G, eps), gamma, beta) if x.shape[0] > 1 else None),
        Mistake("unbiased variance (ddof=1): group norm divides by the number of values in the group",
                lambda c: _affine(_grouped(x, G, eps, ddof=1), gamma, beta)),
        Mistake("eps added to the standard deviation; it belongs inside the root: sqrt(var + eps)",
                lambda c: _affine(_grouped(x, G, eps, eps_outside=True), gamma, beta)),
        Mistake("gamma and beta left out: y = gamma[c] * x_hat + beta[c] per channel",
                lambda c: _grouped(x, G, eps)),
    ]
    if eps != 1e-5:
        table.append(Mistake(f"eps ignored: you used eps = 1e-5 instead of the eps passed ({eps:g} here)",
                             lambda c: _affine(_grouped(x, G, 1e-5), gamma, beta)))
    return table


def _gn_cases():
    rng = np.random.default_rng(8)
    out = []
    for name, shape, G, eps in [("(4, 6, 3, 3), G = 3", (4, 6, 3, 3), 3, 1e-5),
                                ("(2, 8, 5), G = 4, eps = 0.1", (2, 8, 5), 4, 0.1),
                                ("(3, 4, 2, 2), G = 1", (3, 4, 2, 2), 1, 1e-5),
                                ("(2, 6, 2, 3), G = 6", (2, 6, 2, 3), 6, 1e-3),
                                ("(5, 4), G = 2, no spatial axes", (5, 4), 2, 1e-5)]:
        C = shape[1]
        x = rng.normal(2.0, 3.0, size=shape) * rng.uniform(0.2, 5.0, size=(1, C) + (1,) * (len(shape) - 2))
        gamma, beta = rng.uniform(0.5, 2.0, C), rng.normal(size=C)
        out.append(Case(name, (x, G, gamma, beta, eps), reference_group_norm(x, G, gamma, beta, eps), 1e-10))
    return out


def check_group_norm(fn, verbose: bool = True) -> bool:
    """Run ``fn(x, num_groups, gamma, beta, eps)`` on five float64 cases against ``F.group_norm``; print a
    diagnosis of the first failure; True if every case agrees to 1e-10.

    Defined in: chapters/08_small_batches.ipynb
    """
    return run(fn, _gn_cases(), inputs=("x", "num_groups", "gamma", "beta", "eps"), outputs=("y",),
               mistakes=_gn_mistakes,
               unknown="compare x_hat (before gamma and beta) with F.group_norm(torch.from_numpy(x), G)",
               summary="each example's groups of C/G channels are normalised on their own", verbose=verbose)


# ----------------------------------------------------------------------------------------------------
# AdaBN
# ----------------------------------------------------------------------------------------------------

def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reference_adapt_bn(model, x, batch_size):
    """AdaBN: every BN layer's running statistics become the average over the batches of ``x`` of their batch
    mean and unbiased variance (torch's ``momentum=None``), weights untouched, the model left in eval mode."""
    model = copy.deepcopy(model).eval()  # dropout off: the statistics of the network used at test time
    saved = [(bn.momentum, bn.training) for bn in _bn_layers(model)]
    for bn in _bn_layers(model):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, x.shape[0], batch_size):
        model(x[i: i + batch_size])
    for bn, (momentum, _) in zip(_bn_layers(model), saved):
        bn.momentum = momentum
    return model.eval()


def _stats(model):
    """The outputs compared: (running means concatenated, running vars concatenated, logits in eval mode)."""
    bns = _bn_layers(model)
    return (torch.cat([b.running_mean for b in bns]), torch.cat([b.running_var for b in bns]))


class _Net(nn.Module):
    """A small conv net with BN and dropout: the model the AdaBN cases adapt."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Flatten(), nn.Linear(4 * 4 * 4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                                  nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


def _adabn_cases():
    out = []
    for k, (n, B) in enumerate([(40, 8), (30, 10), (48, 16)]):
        torch.manual_seed(80 + k)
        net = _Net().double()
        # "source" training: a few forward passes that move the running statistics away from (0, 1)
        net.train()
        with torch.no_grad():
            for _ in range(5):
                net(torch.randn(16, 1, 6, 6, dtype=torch.float64))
        net.eval()
        g = torch.Generator().manual_seed(90 + k)
        x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) * 2 + 1  # the shifted "target" data
        ref = reference_adapt_bn(net, x, B)
        out.append(Case(f"{n} target images in batches of {B}", (net, x, B), _stats(ref), (1e-10, 1e-10),
                        data={"net": net, "x": x, "B": B, "ref": ref}))
    return out


@torch.no_grad()
def _wrong(net, x, B, reset=True, momentum_none=True, whole_model=False, one_batch=False):
    """The statistics a wrong version leaves: no reset, the layer's momentum, model.train() (dropout on, with
    the checker's seed), or one batch of everything."""
    net = copy.deepcopy(net).eval()
    for bn in _bn_layers(net):
        if reset:
            bn.reset_running_stats()
        if momentum_none:
            bn.momentum = None
        bn.train()
    if whole_model:
        net.train()
    torch.manual_seed(_SEED)
    for i in range(0, x.shape[0], x.shape[0] if one_batch else B):
        net(x[i: i + (x.shape[0] if one_batch else B)])
    return _stats(net)


_SEED = 0  # the global seed set before the reader's function runs (dropout masks of a model.train() version)


def _adabn_mistakes(case: Case):
    net, x, B = case.args
    return [
        Mistake("the statistics did not change: the BN layers were in eval mode while the batches went through "
                "(torch.no_grad() does not switch modes; call .train() on the BN layers)",
                lambda c: _stats(net)),
        Mistake("a moving average with the layer's momentum (0.1) that starts from the source statistics: reset "
                "the running statistics and set momentum = None for a plain average over the batches",
                lambda c: _wrong(net, x, B, reset=False, momentum_none=False)),
        Mistake("the statistics were reset, but averaged with the layer's momentum (0.1), which weighs the last "
                "batches most and the first one with (0,1)-initialised buffers; set momentum = None",
                lambda c: _wrong(net, x, B, momentum_none=False)),
        Mistake("one batch of all the data: its unbiased variance is not the average of the batches' variances "
                "(use batches of batch_size, as the model will see at test time)",
                lambda c: _wrong(net, x, B, one_batch=True) if B < x.shape[0] else None),
        Mistake("model.train() also turned dropout on, so the later BN layers saw dropped-out activations that "
                "the network never sees at test time: put only the BN layers in training mode",
                lambda c: _wrong(net, x, B, whole_model=True)),
    ]


def check_adapt_bn(fn, verbose: bool = True) -> bool:
    """Run ``fn(model, x, batch_size)`` (in place, returns None) on three small BN networks and shifted data;
    compare every BN layer's running mean and variance with :func:`reference_adapt_bn`; also check that the
    weights did not change, that the model is left in eval mode and that each BN layer's momentum is restored.

    Defined in: chapters/08_small_batches.ipynb
    """
    def call(model, x, batch_size):
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
                  and "num_batches" not in k}
        momenta = [bn.momentum for bn in _bn_layers(model)]
        torch.manual_seed(_SEED)
        out = fn(model, x, batch_size)
        if out is not None and out is not model:
            raise Diagnosis("adapt_bn should change the model in place and return None (or the model)")
        changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
        if changed:
            raise Diagnosis(f"the weights changed ({', '.join(changed)}): AdaBN re-estimates the BN statistics "
                            f"only; run the batches under torch.no_grad() and take no optimiser step")
        if [bn.momentum for bn in _bn_layers(model)] != momenta:
            raise Diagnosis("a BN layer's momentum was not restored after the adaptation")
        if any(m.training for m in model.modules()):
            raise Diagnosis("the model is left in training mode: call model.eval() at the end (the adapted "
                            "statistics are for inference)")
        return _stats(model)

    call.__name__ = getattr(fn, "__name__", "adapt_bn")  # for the harness's messages (e.g. an unfilled stub)
    cases = _adabn_cases()
    return run(call, cases, inputs=("model", "x", "batch_size"),
               outputs=("running means", "running variances"), mistakes=_adabn_mistakes, mutable=("model",),
               unknown="compare one layer's running_mean with the mean of its batch means over the batches of x",
               summary="every BN layer's running statistics are the average over the target batches",
               verbose=verbose)
