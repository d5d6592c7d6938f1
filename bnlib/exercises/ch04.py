"""Checkers for the coding exercises of chapters/04_train_vs_inference.ipynb (training versus inference).

- :func:`check_update_running_stats`: a reader's
  ``fn(running_mean, running_var, batch_mean, batch_var, n, momentum, num_batches_tracked, training)
  -> (running_mean, running_var, num_batches_tracked)``, one update of the running estimates as
  ``torch.nn.BatchNorm*`` does it (``batch_var`` is the biased batch variance used to normalise, n the
  number of values per channel).
- :func:`check_fold_bn_into_linear`: a reader's ``fn(W, b, bn) -> (W_fold, b_fold)`` that folds an
  inference-mode :class:`bnlib.numpy_bn.BatchNorm` into the Linear layer ``x @ W.T + b`` before it.

Each checker runs the reader's function on several cases against an independent float64 reference. At the
first failing case it prints which case and which output failed, the largest error, and the likely cause,
found by comparing the reader's output with the classic mistakes (biased running variance, the momentum
convention swapped, momentum=None mishandled, updating in eval mode; a forgotten bias, batch statistics
instead of running ones, eps outside the square root, the scale on the wrong axis). It returns True or False.

Defined in: chapters/04_train_vs_inference.ipynb
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["check_update_running_stats", "check_fold_bn_into_linear"]


# ----------------------------------------------------------------------------------------------------
# Running statistics
# ----------------------------------------------------------------------------------------------------

def _update_variant(rm, rv, bm, bv, n, momentum, nbt, training, *, var="unbiased", convention="torch",
                    none="after", in_eval="skip"):
    """One running-statistics update with one choice per ingredient; the defaults are torch's rule.

    var        : "unbiased" (bv * n / (n - 1): correct), "biased" (bv), "inverted" (bv * (n - 1) / n).
    convention : "torch" (new = (1 - f) * old + f * batch: correct), "swapped" (new = f * old + (1 - f) * batch).
    none       : momentum=None -> f = 1 / (nbt + 1) ("after": correct, the count includes this batch),
                 "before" (f = 1 / nbt, the count before this batch).
    in_eval    : "skip" (eval leaves everything unchanged: correct), "update" (updates anyway).
    """
    if not training and in_eval == "skip":
        return rm.copy(), rv.copy(), nbt
    nbt_new = nbt + 1
    if momentum is None:
        with np.errstate(divide="ignore"):
            f = 1.0 / nbt_new if none == "after" else (np.inf if nbt == 0 else 1.0 / nbt)
    else:
        f = momentum
    v = {"unbiased": bv * n / (n - 1), "biased": bv, "inverted": bv * (n - 1) / n}[var]
    if convention == "swapped":
        f = 1.0 - f
    with np.errstate(invalid="ignore"):
        return (1 - f) * rm + f * bm, (1 - f) * rv + f * v, nbt_new


_UPDATE_CAUSES = {
    ("var", "biased"): "the running variance got the biased batch variance; torch stores the unbiased one, "
                       "batch_var * n / (n - 1) (the paper's m/(m-1) of Algorithm 2)",
    ("var", "inverted"): "the Bessel factor is upside down: the unbiased variance is batch_var * n / (n - 1), "
                         "not batch_var * (n - 1) / n",
    ("convention", "swapped"): "the momentum convention is swapped: torch's rule is new = (1 - momentum) * old "
                               "+ momentum * batch (momentum = 0.1 weights the NEW batch); "
                               "new = momentum * old + (1 - momentum) * batch is the Keras/CS231n convention",
    ("none", "before"): "with momentum=None the factor is 1 / num_batches_tracked AFTER counting this batch, "
                        "i.e. 1 / (num_batches_tracked + 1) with the count you were given",
    ("in_eval", "update"): "you updated the running statistics with training=False; in eval mode nothing "
                           "changes (running_mean, running_var and num_batches_tracked stay as they are)",
}


def _update_reference(rm, rv, bm, bv, n, momentum, nbt, training):
    return _update_variant(rm, rv, bm, bv, n, momentum, nbt, training)


def _update_mistakes(case):
    args = case.args
    choices = {"var": ["unbiased", "biased", "inverted"], "convention": ["torch", "swapped"],
               "none": ["after", "before"], "in_eval": ["skip", "update"]}
    correct = {k: v[0] for k, v in choices.items()}
    combos = [dict(zip(choices, vals)) for vals in itertools.product(*choices.values())]
    combos.sort(key=lambda c: sum(c[k] != correct[k] for k in c))
    for combo in combos[1:]:
        yield Mistake([_UPDATE_CAUSES[(k, v)] for k, v in combo.items() if v != correct[k]],
                      lambda case, combo=combo: _update_variant(*args, **combo))
    rm, rv, *_, nbt, training = args
    ref_m, ref_v, _ = case.expected
    if training:
        yield Mistake("num_batches_tracked counts every training batch: return num_batches_tracked + 1",
                      lambda case: (ref_m, ref_v, nbt))
    else:
        yield Mistake("in eval mode nothing is counted: return num_batches_tracked unchanged",
                      lambda case: (ref_m, ref_v, nbt + 1))


def _update_raise_hint(e, case):
    momentum = case.args[5]
    if momentum is None and isinstance(e, TypeError):
        return ("momentum=None is not handled; it means a cumulative average, with the factor "
                "1 / (num_batches_tracked + 1) in place of momentum")
    if momentum is None and isinstance(e, ZeroDivisionError):
        return _UPDATE_CAUSES[("none", "before")]
    return None


def _update_cases():
    """(name, rm, rv, bm, bv, n, momentum, nbt, training); batch_var is biased, n values per channel."""
    rng = np.random.default_rng(4)
    C = 4
    cases = []
    for name, n, momentum, nbt, training in [
        ("A: momentum=0.1, n=8, first batch", 8, 0.1, 0, True),
        ("B: momentum=0.1, n=2 (a batch of two)", 2, 0.1, 3, True),
        ("C: momentum=0.3, n=50", 50, 0.3, 7, True),
        ("D: momentum=None, first batch (num_batches_tracked=0)", 6, None, 0, True),
        ("E: momentum=None, num_batches_tracked=4", 5, None, 4, True),
        ("F: momentum=0.1, eval mode (training=False)", 8, 0.1, 5, False),
        ("G: momentum=None, eval mode (training=False)", 8, None, 5, False),
    ]:
        rm = rng.normal(0, 1, C)
        rv = rng.uniform(0.5, 2.0, C)
        bm = rng.normal(2, 1, C)
        bv = rng.uniform(2.0, 5.0, C)
        cases.append((name, rm, rv, bm, bv, n, momentum, nbt, training))
    return cases


def check_update_running_stats(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(running_mean, running_var, batch_mean, batch_var, n, momentum, num_batches_tracked,
    training) -> (running_mean, running_var, num_batches_tracked)``.

    batch_var is the biased variance of the batch (the one used to normalise), n the number of values per
    channel, momentum a float or None, num_batches_tracked the count before this batch. The function may
    update the arrays in place or return new ones. Runs seven cases (momentum 0.1 and 0.3, momentum=None
    from a count of 0 and of 4, eval mode, a batch of two) against a float64 reference; prints one line
    per case and, at the first failure, the largest error and the likely cause. Returns True if all pass.
    """
    cases = [Case(c[0], c[1:], _update_reference(*c[1:]), 1e-10) for c in _update_cases()]
    return run(fn, cases, inputs=("running_mean", "running_var", "batch_mean", "batch_var", "n", "momentum",
                                  "num_batches_tracked", "training"),
               outputs=("running_mean", "running_var", "num_batches_tracked"), mutable=("running_mean", "running_var"),
               mistakes=_update_mistakes, raise_hints=_update_raise_hint,
               unknown="with f = momentum (or 1 / (num_batches_tracked + 1) when momentum is None), "
                       "running_mean = (1 - f) * running_mean + f * batch_mean and "
                       "running_var = (1 - f) * running_var + f * batch_var * n / (n - 1)",
               summary="the running statistics and the count agree with the reference (max |error| <= 1e-10)",
               verbose=verbose)


# ----------------------------------------------------------------------------------------------------
# Folding BN into the Linear layer before it
# ----------------------------------------------------------------------------------------------------

def _fold(W, b, mean, var, gamma, beta, eps, *, eps_mode="inside", axis="rows", bias=True):
    """Folded (W', b') with one choice per ingredient; the defaults are correct.

    eps_mode : "inside" (s = gamma / sqrt(var + eps)), "outside" (gamma / (sqrt(var) + eps)).
    axis     : "rows" (W' = s[:, None] * W: correct), "cols" (W * s[None, :]: the wrong axis).
    bias     : True (b' = (b - mean) * s + beta), False (the Linear's own bias b forgotten).
    """
    s = gamma / np.sqrt(var + eps) if eps_mode == "inside" else gamma / (np.sqrt(var) + eps)
    W_f = s[:, None] * W if axis == "rows" else W * s[None, :]
    b_lin = b if bias else np.zeros_like(b)
    return W_f, (b_lin - mean) * s + beta


_FOLD_CAUSES = {
    ("stats", "batch"): "you used the statistics of the last training batch; at inference there is no batch: "
                        "fold with bn.running_mean and bn.running_var",
    ("stats", "batch_unbiased"): "you used the statistics of the last training batch (with its unbiased "
                                 "variance); fold with bn.running_mean and bn.running_var",
    ("eps_mode", "outside"): "eps is outside the square root: the scale is gamma / sqrt(running_var + eps)",
    ("axis", "cols"): "the scale multiplies the columns of W (the inputs); BN scales output feature o, so it "
                      "multiplies row o: W' = s[:, None] * W",
    ("bias", False): "the Linear layer's own bias is missing: b' = (b - running_mean) * s + beta",
}


def _fold_mistakes(case):
    W, b, bn = case.args
    batch_stats = case.data["batch_stats"]
    gamma = np.ones(bn.num_features) if bn.weight is None else bn.weight.astype(np.float64)
    beta = np.zeros(bn.num_features) if bn.bias is None else bn.bias.astype(np.float64)
    bvec = np.zeros(W.shape[0]) if b is None else b
    stats = {"running": (bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)),
             "batch": batch_stats[:2], "batch_unbiased": (batch_stats[0], batch_stats[2])}
    choices = {"stats": list(stats), "eps_mode": ["inside", "outside"], "axis": ["rows", "cols"],
               "bias": [True, False]}
    correct = {k: v[0] for k, v in choices.items()}
    combos = [dict(zip(choices, vals)) for vals in itertools.product(*choices.values())]
    combos.sort(key=lambda c: sum(c[k] != correct[k] for k in c))
    for combo in combos[1:]:
        if combo["axis"] == "cols" and W.shape[0] != W.shape[1]:
            continue
        if combo["bias"] is False and b is None:
            continue
        mean, var = stats[combo["stats"]]
        yield Mistake([_FOLD_CAUSES[(k, v)] for k, v in combo.items() if v != correct[k]],
                      lambda case, combo=combo, mean=mean, var=var: _fold(
                          W, bvec, mean, var, gamma, beta, bn.eps, eps_mode=combo["eps_mode"],
                          axis=combo["axis"], bias=combo["bias"]))


def _fold_raise_hint(e, case):
    W, b, bn = case.args
    if "broadcast" in str(e):
        return (f"the scale s = gamma / sqrt(running_var + eps) has one entry per OUTPUT feature ({W.shape[0]} "
                f"here) and multiplies the rows of W (shape {W.shape}): W' = s[:, None] * W")
    if b is None and "NoneType" in str(e):
        return "this Linear has no bias (b is None); treat it as zeros"
    if "more than 1 value per channel" in str(e):
        return ("you called bn.forward in training mode; folding needs no data: use bn.weight, bn.bias, "
                "bn.running_mean, bn.running_var and bn.eps")
    return None


def _fold_cases():
    """(name, W, b, bn, batch_stats, x): bn has seen training batches, so its running statistics differ
    from the statistics of the last batch (batch mean, biased var, unbiased var), which its cache holds."""
    from bnlib.numpy_bn import BatchNorm

    rng = np.random.default_rng(11)
    cases = []
    for name, n_in, n_out, bias, eps, mode in [
        ("A: Linear(5, 3) with bias", 5, 3, True, 1e-5, "eval"),
        ("B: Linear(4, 4) with bias, eps=0.1", 4, 4, True, 0.1, "eval"),
        ("C: Linear(6, 4) without bias (b is None), BN left in training mode", 6, 4, False, 1e-5, "train"),
    ]:
        W = rng.normal(0, 1, (n_out, n_in))
        b = rng.normal(0, 1, n_out) if bias else None
        bn = BatchNorm(n_out, eps=eps, momentum=0.3, dtype=np.float64)
        bn.weight[...] = rng.uniform(0.5, 2.0, n_out)
        bn.bias[...] = rng.normal(0, 1, n_out)
        for _ in range(4):
            x = rng.normal(rng.normal(0, 2, n_in), 1.0, (7, n_in))
            z = x @ W.T + (0 if b is None else b)
            bn.forward(z)
        m = z.shape[0]
        batch_stats = (z.mean(axis=0), z.var(axis=0), z.var(axis=0) * m / (m - 1))
        bn.train(mode == "train")
        x = rng.normal(0, 2, (9, n_in))
        cases.append((name, W, b, bn, batch_stats, x))
    return cases


def check_fold_bn_into_linear(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(W, b, bn) -> (W_fold, b_fold)``: fold an inference-mode BatchNorm into ``x @ W.T + b``.

    W has shape (out, in), b shape (out,) or None (a Linear without bias), bn is a
    :class:`bnlib.numpy_bn.BatchNorm` of ``out`` features that has seen training batches. The folded layer
    must satisfy ``x @ W_fold.T + b_fold == bn(x @ W.T + b)`` with bn in eval mode (to 1e-10, float64),
    whatever mode bn is in, and must leave W, b and bn (its parameters, statistics and mode) unchanged. On the
    first failure prints which case, the largest error and the likely cause. Returns True if all three cases
    pass.
    """
    cases = []
    for name, W, b, bn, batch_stats, x in _fold_cases():
        bvec = np.zeros(W.shape[0]) if b is None else b
        ref = _fold(W, bvec, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        cases.append(Case(name, (W, b, bn), ref, 1e-10, data={"batch_stats": batch_stats}))
    return run(fn, cases, inputs=("W", "b", "bn"), outputs=("W_fold", "b_fold"), mistakes=_fold_mistakes,
               raise_hints=_fold_raise_hint,
               mutation_hints={"bn": "folding reads bn.weight, bn.bias, bn.running_mean, bn.running_var and "
                                     "bn.eps and changes nothing: no bn.forward, no bn.eval() or bn.train()"},
               unknown="with s = gamma / sqrt(running_var + eps), W' = s[:, None] * W and "
                       "b' = (b - running_mean) * s + beta",
               summary="the folded layer equals Linear -> BatchNorm in eval mode (max |error| <= 1e-10)",
               verbose=verbose)
