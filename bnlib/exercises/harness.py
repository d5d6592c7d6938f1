"""The one harness behind every exercise checker.

A checker declares its cases (inputs and the reference outputs), the names of its inputs and outputs, and a
table of recognised mistakes; :func:`run` does the rest, in this order, for every case:

1. call the reader's function on copies of the inputs, safely: an exception becomes a diagnosis
   (``NotImplementedError``: the stub is not filled in; autograd's "modified by an inplace operation":
   an input was modified in place; any other: its type and message, plus the checker's hint if one matches);
2. mutation: every input (arrays, tensors, modules and their train/eval flag, objects such as
   :class:`bnlib.numpy_bn.BatchNorm`) must be left as it was, unless the checker allows it;
3. the return value: its type, the length of a tuple, then each output's type, shape and dtype;
4. the values: the largest error of each output against the reference, within the case's tolerance;
5. the mistakes: the first entry of the table whose outputs the reader's reproduce names the likely cause;
   otherwise "not a mistake this checker recognises" with the checker's hint.

Every message has the same form: ``case NAME: what is wrong`` then indented ``likely cause: ...`` lines; a
passing case prints ``case NAME: ok`` and the last line is ``all N cases pass: ...``. Errors are printed as
magnitudes; an error at rounding level is printed as a bound (``< 1e-10``), so that a chapter's output is the
same on every CPU.

Defined in: chapters/01_why_normalize.ipynb ... chapters/07_mnist.ipynb (the "Exercises" section of each).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Case", "Mistake", "Diagnosis", "call", "run", "magnitude", "changes"]


class Diagnosis(Exception):
    """Raised by a checker's adapter around the reader's code: its message is printed as the diagnosis."""


@dataclass
class Case:
    """One case: ``name``, the ``args`` passed to the reader's function (as copies), the reference ``expected``
    (one output, or a tuple for a tuple-returning function), the absolute ``tol`` (per output if a tuple), and
    anything the mistakes need in ``data``."""

    name: str
    args: tuple
    expected: Any
    tol: float | Sequence[float] = 1e-10
    data: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A recognised mistake: the ``causes`` printed (one ``likely cause:`` line each) and ``make(case)``,
    the outputs that mistake produces on the case (same structure as ``case.expected``, None for an output the
    mistake says nothing about; None instead of the outputs if it does not apply to the case)."""

    causes: str | Sequence[str]
    make: Callable[[Case], Any]


def magnitude(err: float, floor: float) -> str:
    """An error for a message: its value when it is above ``floor``, else the bound ``< floor``."""
    if not np.isfinite(err):
        return str(err)
    return f"{err:.3g}" if err >= floor else f"< {floor:.0e}"


# ----------------------------------------------------------------------------------------------------
# Mutation
# ----------------------------------------------------------------------------------------------------

def _torch():
    import sys

    return sys.modules.get("torch")


def _snapshot(obj):
    torch = _torch()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if torch is not None and isinstance(obj, torch.nn.Module):
        state = {f"{k}": v.detach().clone() for k, v in obj.state_dict().items()}
        state.update({f"{n}.training" if n else "training": m.training for n, m in obj.named_modules()})
        return state
    if isinstance(obj, np.dtype):
        return obj
    if hasattr(obj, "__dict__") and not (inspect.isroutine(obj) or inspect.isclass(obj) or inspect.ismodule(obj)):
        return {k: _snapshot(v) for k, v in vars(obj).items() if not k.startswith("_") and not inspect.isroutine(v)}
    if isinstance(obj, (int, float, bool, str, type(None), tuple)):
        return obj
    return None  # functions and other objects: not compared


def _same(a, b) -> bool:
    torch = _torch()
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype and \
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if torch is not None and isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
            bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):  # e.g. an array compared with a scalar
        return False


def changes(before, obj, label: str) -> list[str]:
    """What changed in ``obj`` since ``before = _snapshot(obj)``, as readable items."""
    after = _snapshot(obj)
    if isinstance(before, dict):
        out = []
        for k, v in before.items():
            if k not in after:
                out.append(f"{label}.{k} removed")
            elif isinstance(v, dict):
                out += changes(v, getattr(obj, k), f"{label}.{k}") if hasattr(obj, k) else []
            elif not _same(v, after[k]):
                if k.endswith("training") or isinstance(v, (bool, int, float, str)) or v is None:
                    out.append(f"{label}.{k}: {v} -> {after[k]}")
                else:
                    out.append(f"{label}.{k}")
        return out
    if before is None:
        return []
    if not _same(before, after):
        return [label]
    return []


# ----------------------------------------------------------------------------------------------------
# Output structure and values
# ----------------------------------------------------------------------------------------------------

def _kind(x) -> str:
    torch = _torch()
    if isinstance(x, np.ndarray):
        return "a NumPy array"
    if torch is not None and isinstance(x, torch.Tensor):
        return "a tensor"
    if x is None:
        return "None"
    return type(x).__name__


def _as64(x) -> np.ndarray:
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _structure(out, expected, labels: Sequence[str]) -> str | None:
    """Why ``out`` does not have the structure of ``expected`` (None if it does)."""
    if isinstance(expected, tuple):
        want = f"a tuple of {len(expected)}: ({', '.join(labels)})"
        if not isinstance(out, tuple):
            return f"your function returned {_kind(out)}, expected {want}"
        if len(out) != len(expected):
            return f"your function returned a tuple of {len(out)}, expected {want}"
        pairs = zip(labels, out, expected)
    else:
        if isinstance(out, tuple) and not isinstance(expected, tuple):
            return f"your function returned a tuple of {len(out)}, expected {labels[0]} only"
        pairs = [(labels[0], out, expected)]
    for label, o, e in pairs:
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            if not isinstance(o, (int, np.integer)) or isinstance(o, bool):
                return f"{label} is {_kind(o)}, expected an int"
            continue
        if _kind(o) != _kind(e):
            return f"{label} is {_kind(o)}, expected {_kind(e)} of shape {tuple(e.shape)}"
        if tuple(o.shape) != tuple(e.shape):
            return f"{label} has shape {tuple(o.shape)}, expected {tuple(e.shape)}"
        if o.dtype != e.dtype:
            return (f"{label} has dtype {o.dtype}, expected {e.dtype} (the inputs' dtype): something in your "
                    f"computation is in another precision (a constant, an array or a layer created with "
                    f"another dtype, or an .astype/.to)")
    return None


def _outputs(x, expected) -> tuple:
    return x if isinstance(expected, tuple) else (x,)


def _error(got, want, rel: bool) -> float:
    if isinstance(want, (int, np.integer)):
        return 0.0 if got == want else float("inf")
    g, w = _as64(got), _as64(want)
    if g.size == 0:
        return 0.0
    if not np.array_equal(np.isfinite(g), np.isfinite(w)):
        return float("inf")
    fin = np.isfinite(w)
    if not fin.any():
        return 0.0
    d = np.abs(g[fin] - w[fin])
    err = float(d.max())
    if rel:
        err /= max(float(np.abs(w[fin]).max()), 1e-300)
    return err


def _where(got, want) -> str:
    if isinstance(want, (int, np.integer)):
        return f": {got}, expected {want}"
    g, w = _as64(got), _as64(want)
    if g.ndim == 0:
        return ""
    d = np.where(np.isfinite(g) == np.isfinite(w), np.abs(np.nan_to_num(g - w, nan=np.inf)), np.inf)
    d = np.where(np.isfinite(w) | np.isfinite(g), d, 0.0)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(d)), d.shape))
    n_bad = int((~np.isfinite(g)).sum())
    note = f" ({n_bad} NaN/inf values)" if n_bad else ""
    return f" at index {idx}: yours {g[idx]:.6g}, expected {w[idx]:.6g}{note}"


def _close(got, wrong, tol: float, rel: bool) -> bool:
    if wrong is None:
        return False
    if isinstance(wrong, (int, np.integer)):
        return got == wrong
    g, w = _as64(got), _as64(wrong)
    if g.shape != w.shape:
        return False
    if not np.array_equal(np.isfinite(g), np.isfinite(w)):
        return False
    fin = np.isfinite(w)
    if not fin.any():
        return True
    d = float(np.abs(g[fin] - w[fin]).max())
    scale = float(np.abs(w[fin]).max())
    return d <= (10 * tol * scale if rel else tol) + 1e-8 * scale


# ----------------------------------------------------------------------------------------------------
# Calling the reader's code
# ----------------------------------------------------------------------------------------------------

INPLACE_AUTOGRAD = "modified by an inplace operation"


class _Bare(str):
    """A message printed without its case (it is the same for every case)."""


def call(fn, args: tuple, input_labels: Sequence[str]):
    """``(True, result)`` or ``(False, lines of the diagnosis)``; never raises."""
    try:
        return True, fn(*args)
    except Diagnosis as d:
        return False, [str(d)]
    except NotImplementedError:
        name = getattr(fn, "__name__", "your function")
        return False, [_Bare(f"{name} raises NotImplementedError: fill in the stub, then run the checker again")]
    except Exception as e:  # the reader's code may fail in any way
        if isinstance(e, RuntimeError) and INPLACE_AUTOGRAD in str(e):
            x = input_labels[0] if input_labels else "an input"
            return False, [f"you modified {x} in place (x -= ..., x.sub_(...), x[...] = ...), and autograd "
                           f"needs its original value for the gradient; compute on new tensors: x - mu, not "
                           f"x.sub_(mu)"]
        return False, [f"your function raised {type(e).__name__}: {e}", e]


def run(fn, cases: Sequence[Case], *, inputs: Sequence[str], outputs: Sequence[str],
        mistakes: Callable[[Case], Iterable[Mistake]] | Sequence[Mistake] = (),
        unknown: str | Callable[[Case, list[str]], str] = "",
        summary: str = "every output agrees with the reference",
        raise_hints: Callable[[Exception, Case], str | None] | None = None,
        mutable: Sequence[str] = (), mutation_hints: dict[str, str] | None = None,
        shape_hint: Callable[[str, Any, Case], str] | None = None,
        adapt: Callable[[Any, Case], Any] | None = None,
        after: Callable[[Case], str | None] | None = None,
        rel: bool = False, verbose: bool = True) -> bool:
    """Run ``fn`` on every case and print the diagnosis of the first failure; True if every case passes.

    inputs / outputs : names of the function's arguments and of its outputs, for the messages.
    mistakes         : the table of recognised mistakes (or a function of the case giving it), fewest first.
    unknown          : the hint printed when no mistake matches (or a function of the case and the wrong
                       outputs' names).
    raise_hints      : hint for an exception raised by the reader's code (None if nothing to add).
    mutable          : inputs the function may change in place; mutation_hints: advice per input name.
    shape_hint       : advice appended to a shape message, from (output name, the reader's output, case).
    adapt            : turns the reader's return value into the outputs compared (may raise Diagnosis).
    after            : a last check of a case whose outputs agree (returns a message if it fails).
    rel              : errors relative to the largest magnitude of the reference output.
    """
    say = (lambda *lines: print("\n".join(str(s) for s in lines))) if verbose else (lambda *lines: None)
    mutation_hints = mutation_hints or {}
    for case in cases:
        args = tuple(copy.deepcopy(a) if _snapshot(a) is not None else a for a in case.args)
        before = [_snapshot(a) for a in args]
        ok, out = call(fn, args, inputs)
        if ok:
            for label, b, a in zip(inputs, before, args):
                if label in mutable:
                    continue
                changed = changes(b, a, label)
                if changed:
                    hint = mutation_hints.get(label, "compute on new arrays or tensors (x = x - mu, not x -= mu)")
                    detail = "" if changed == [label] else f" ({'; '.join(changed)})"
                    say(f"case {case.name}: your function modified {label} in place{detail}; {hint}")
                    return False
        if ok and adapt is not None:
            ok, out = call(lambda o: adapt(o, case), (out,), inputs)
        if not ok:
            lines = [out[0] if isinstance(out[0], _Bare) else f"case {case.name}: {out[0]}"]
            if len(out) > 1 and raise_hints is not None:
                hint = raise_hints(out[1], case)
                if hint:
                    lines.append(f"  likely cause: {hint}")
            say(*lines)
            return False
        problem = _structure(out, case.expected, outputs)
        if problem:
            label = next((lab for lab in outputs if problem.startswith(lab + " ")), None)
            extra = ""
            if shape_hint is not None and label is not None and " has shape " in problem:
                extra = shape_hint(label, _outputs(out, case.expected)[list(outputs).index(label)], case)
            say(f"case {case.name}: {problem}" + (f". {extra}" if extra else ""))
            return False
        got, want = _outputs(out, case.expected), _outputs(case.expected, case.expected)
        tols = case.tol if isinstance(case.tol, (tuple, list)) else [case.tol] * len(want)
        errs = [_error(g, w, rel) for g, w in zip(got, want)]
        bad = [i for i, (e, t) in enumerate(zip(errs, tols)) if not e <= t]
        if not bad:
            msg = after(case) if after is not None else None
            if msg:
                say(f"case {case.name}: {msg}")
                return False
            say(f"case {case.name}: ok")
            continue
        kind = "relative error" if rel else "max |error|"
        lines = [("  " if n else f"case {case.name}: ") + (
                 f"{outputs[i]} = {got[i]}, expected {want[i]}" if isinstance(want[i], (int, np.integer)) else
                 f"{outputs[i]} differs from the reference, {kind} = {magnitude(errs[i], tols[i])}"
                 f"{_where(got[i], want[i])}") for n, i in enumerate(bad)]
        case.data["got"] = got  # a mistake may depend on the reader's result (e.g. a step fitted to it)
        table = mistakes(case) if callable(mistakes) else mistakes
        causes = None
        for m in table:
            try:
                wrong = m.make(case)
            except Exception:  # a mistake that cannot be computed on this case does not apply
                continue
            if wrong is None:
                continue
            wrong = _outputs(wrong, case.expected)
            compared = [i for i in range(len(got)) if wrong[i] is not None]  # None: not part of the mistake
            if len(wrong) == len(got) and compared and all(_close(got[i], wrong[i], tols[i], rel) for i in compared):
                causes = [m.causes] if isinstance(m.causes, str) else list(m.causes)
                break
        if causes:
            lines += [f"  likely cause: {c}" for c in causes]
        else:
            hint = unknown(case, [outputs[i] for i in bad]) if callable(unknown) else unknown
            lines.append(f"  not a mistake this checker recognises: {hint}")
        say(*lines)
        return False
    say(f"all {len(cases)} cases pass: {summary}")
    return True
