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


def _diagnose_update(out_m, out_v, out_nbt, args) -> list[str]:
    choices = {"var": ["unbiased", "biased", "inverted"], "convention": ["torch", "swapped"],
               "none": ["after", "before"], "in_eval": ["skip", "update"]}
    correct = {k: v[0] for k, v in choices.items()}
    combos = [dict(zip(choices, vals)) for vals in itertools.product(*choices.values())]
    combos.sort(key=lambda c: sum(c[k] != correct[k] for k in c))
    for combo in combos[1:]:
        wm, wv, _ = _update_variant(*args, **combo)
        if (np.allclose(out_m, wm, rtol=1e-9, atol=1e-12, equal_nan=True)
                and np.allclose(out_v, wv, rtol=1e-9, atol=1e-12, equal_nan=True)):
            return [_UPDATE_CAUSES[(k, v)] for k, v in combo.items() if v != correct[k]]
    return []


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
    say = print if verbose else (lambda *a, **k: None)
    cases = _update_cases()
    for name, rm, rv, bm, bv, n, momentum, nbt, training in cases:
        args = (rm, rv, bm, bv, n, momentum, nbt, training)
        ref_m, ref_v, ref_nbt = _update_reference(*args)
        a_rm, a_rv, a_bm, a_bv = rm.copy(), rv.copy(), bm.copy(), bv.copy()
        try:
            with np.errstate(all="ignore"):
                out = fn(a_rm, a_rv, a_bm, a_bv, n, momentum, nbt, training)
        except NotImplementedError:
            say("update_running_stats raises NotImplementedError: fill in the stub, then run the checker again")
            return False
        except Exception as e:  # the reader's code may fail in any way
            say(f"case {name}: your function raised {type(e).__name__}: {e}")
            if momentum is None and isinstance(e, TypeError):
                say("  likely cause: momentum=None is not handled; it means a cumulative average, with the "
                    "factor 1 / (num_batches_tracked + 1) in place of momentum")
            elif momentum is None and isinstance(e, ZeroDivisionError):
                say(f"  likely cause: {_UPDATE_CAUSES[('none', 'before')]}")
            return False
        if not (isinstance(out, tuple) and len(out) == 3):
            say(f"case {name}: expected a tuple (running_mean, running_var, num_batches_tracked), "
                f"got {type(out).__name__}{' of length ' + str(len(out)) if isinstance(out, tuple) else ''}")
            return False
        out_m, out_v = (np.asarray(a, dtype=np.float64) for a in out[:2])
        out_nbt = out[2]
        if out_m.shape != rm.shape or out_v.shape != rv.shape:
            say(f"case {name}: shapes {out_m.shape} and {out_v.shape}, expected {rm.shape} (one value per channel)")
            return False
        err_m = float(np.nanmax(np.abs(out_m - ref_m))) if not np.isnan(out_m).all() else float("nan")
        err_v = float(np.nanmax(np.abs(out_v - ref_v))) if not np.isnan(out_v).all() else float("nan")
        ok_m = np.isfinite(out_m).all() and err_m <= 1e-10
        ok_v = np.isfinite(out_v).all() and err_v <= 1e-10
        if ok_m and ok_v and out_nbt == ref_nbt:
            say(f"case {name}: ok")
            continue
        if ok_m and ok_v:
            say(f"case {name}: num_batches_tracked = {out_nbt}, expected {ref_nbt}")
            if training:
                say("  likely cause: num_batches_tracked counts every training batch: return "
                    "num_batches_tracked + 1")
            else:
                say("  likely cause: in eval mode nothing is counted: return num_batches_tracked unchanged")
            return False
        bad = [f"running_mean (max |error| = {err_m:.3g})"] * (not ok_m) + \
              [f"running_var (max |error| = {err_v:.3g})"] * (not ok_v)
        say(f"case {name}: {' and '.join(bad)} differ from the reference")
        causes = _diagnose_update(out_m, out_v, out_nbt, args)
        if causes:
            for cause in causes:
                say(f"  likely cause: {cause}")
        else:
            say("  not a mistake this checker recognises: with f = momentum (or 1 / (num_batches_tracked + 1) "
                "when momentum is None), running_mean = (1 - f) * running_mean + f * batch_mean and "
                "running_var = (1 - f) * running_var + f * batch_var * n / (n - 1)")
        return False
    say(f"all {len(cases)} cases agree with the reference (max |error| <= 1e-10)")
    return True


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


def _diagnose_fold(W_f, b_f, W, b, bn, batch_stats) -> list[str]:
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
        Wv, bv = _fold(W, bvec, mean, var, gamma, beta, bn.eps, eps_mode=combo["eps_mode"],
                       axis=combo["axis"], bias=combo["bias"])
        if np.allclose(W_f, Wv, rtol=1e-9, atol=1e-12) and np.allclose(b_f, bv, rtol=1e-9, atol=1e-12):
            return [_FOLD_CAUSES[(k, v)] for k, v in combo.items() if v != correct[k]]
    return []


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
    whatever mode bn is in, and must leave W, b and bn unchanged. On the first failure prints which case,
    the largest error and the likely cause. Returns True if all three cases pass.
    """
    import copy

    say = print if verbose else (lambda *a, **k: None)
    cases = _fold_cases()
    for name, W, b, bn, batch_stats, x in cases:
        ref_bn = copy.deepcopy(bn).eval()
        ref = ref_bn.forward(x @ W.T + (0 if b is None else b))
        W_in = W.copy()
        b_in = None if b is None else b.copy()
        bn_in = copy.deepcopy(bn)
        try:
            out = fn(W_in, b_in, bn_in)
        except NotImplementedError:
            say("fold_bn_into_linear raises NotImplementedError: fill in the stub, then run the checker again")
            return False
        except Exception as e:
            say(f"case {name}: your function raised {type(e).__name__}: {e}")
            if "broadcast" in str(e):
                say(f"  likely cause: the scale s = gamma / sqrt(running_var + eps) has one entry per OUTPUT "
                    f"feature ({W.shape[0]} here) and multiplies the rows of W (shape {W.shape}): "
                    f"W' = s[:, None] * W")
            elif b is None and "NoneType" in str(e):
                say("  likely cause: this Linear has no bias (b is None); treat it as zeros")
            elif "more than 1 value per channel" in str(e):
                say("  likely cause: you called bn.forward in training mode; folding needs no data: use "
                    "bn.weight, bn.bias, bn.running_mean, bn.running_var and bn.eps")
            return False
        if not np.array_equal(W_in, W) or (b is not None and not np.array_equal(b_in, b)):
            say(f"case {name}: your function modified W or b in place; return new arrays")
            return False
        if (not np.array_equal(bn_in.running_mean, bn.running_mean)
                or not np.array_equal(bn_in.running_var, bn.running_var)
                or bn_in.num_batches_tracked != bn.num_batches_tracked):
            say(f"case {name}: your function changed bn's running statistics (did it call bn.forward in "
                f"training mode?); folding reads bn.running_mean and bn.running_var and changes nothing")
            return False
        if not (isinstance(out, tuple) and len(out) == 2):
            say(f"case {name}: expected a tuple (W_fold, b_fold), got {type(out).__name__}")
            return False
        W_f, b_f = (None if a is None else np.asarray(a, dtype=np.float64) for a in out)
        if b_f is None:
            say(f"case {name}: b_fold is None; the folded layer always has a bias "
                f"(beta - running_mean * s, plus the scaled bias of the Linear)")
            return False
        if W_f.shape != W.shape or b_f.shape != (W.shape[0],):
            say(f"case {name}: W_fold has shape {W_f.shape} and b_fold {b_f.shape}, expected {W.shape} and "
                f"{(W.shape[0],)}")
            return False
        y = x @ W_f.T + b_f
        err = float(np.max(np.abs(y - ref)))
        if np.isfinite(y).all() and err <= 1e-10:
            say(f"case {name}: ok")
            continue
        say(f"case {name}: x @ W_fold.T + b_fold differs from bn(x @ W.T + b) in eval mode, "
            f"max |error| = {err:.3g}")
        causes = _diagnose_fold(W_f, b_f, W, b, bn, batch_stats)
        if causes:
            for cause in causes:
                say(f"  likely cause: {cause}")
        else:
            say("  not a mistake this checker recognises: with s = gamma / sqrt(running_var + eps), "
                "W' = s[:, None] * W and b' = (b - running_mean) * s + beta")
        return False
    say(f"all {len(cases)} cases: the folded layer equals Linear -> BatchNorm in eval mode (max |error| <= 1e-10)")
    return True
