"""The chapter-06 checker accepts a correct autograd.Function and diagnoses each mistake it claims to."""

import numpy as np
import pytest
import torch

from bnlib.exercises.ch06 import check_normalize_function


def _stats(x, eps):
    mu = x.mean(0, keepdim=True)
    inv_std = 1 / (x.var(0, keepdim=True, correction=0) + eps).sqrt()
    return mu, inv_std


def _compact(dy, x_hat, inv_std):
    return (dy - dy.mean(0, keepdim=True) - x_hat * (dy * x_hat).mean(0, keepdim=True)) * inv_std


class Good(torch.autograd.Function):
    """Saves x, recomputes x_hat in backward with differentiable ops."""

    @staticmethod
    def forward(x, eps):
        mu, inv_std = _stats(x, eps)
        return (x - mu) * inv_std

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        mu, inv_std = _stats(x, ctx.eps)
        return _compact(dy, (x - mu) * inv_std, inv_std), None


class GoodOldStyle(torch.autograd.Function):
    """The ctx-in-forward style; saves the output x_hat (an output stays connected to the graph) and x."""

    @staticmethod
    def forward(ctx, x, eps):
        mu, inv_std = _stats(x, eps)
        x_hat = (x - mu) * inv_std
        ctx.save_for_backward(x, x_hat)
        ctx.eps = eps
        return x_hat

    @staticmethod
    def backward(ctx, dy):
        x, x_hat = ctx.saved_tensors
        _, inv_std = _stats(x, ctx.eps)
        return _compact(dy, x_hat, inv_std), None


def make(dx_fn=None, save="x", forward_fn=None, n_grads=2, out_dtype=None):
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, eps):
            if forward_fn is not None:
                out = forward_fn(x, eps)
            else:
                mu, inv_std = _stats(x, eps)
                out = (x - mu) * inv_std
            mu, inv_std = _stats(x, eps)
            x_hat = (x - mu) * inv_std
            ctx.eps = eps
            if save == "x_hat":
                ctx.save_for_backward(x_hat.clone(), inv_std)  # intermediates: constants to autograd
            else:
                ctx.save_for_backward(x, inv_std.clone())
            return out.to(out_dtype) if out_dtype else out

        @staticmethod
        def backward(ctx, dy):
            if save == "x_hat":
                x_hat, inv_std = ctx.saved_tensors
            elif save == "x_and_inv_std":
                x, inv_std = ctx.saved_tensors
                x_hat = (x - x.mean(0, keepdim=True)) * inv_std
            else:
                x, _ = ctx.saved_tensors
                mu, inv_std = _stats(x, ctx.eps)
                x_hat = (x - mu) * inv_std
            dx = (dx_fn or _compact)(dy, x_hat, inv_std)
            return (dx, None) if n_grads == 2 else dx
    return F


class NumpyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        mu, inv_std = _stats(x, eps)
        ctx.save_for_backward(x)
        ctx.eps = eps
        return (x - mu) * inv_std

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        xn, dyn = x.detach().numpy(), dy.detach().numpy()
        inv = 1 / np.sqrt(xn.var(0) + ctx.eps)
        xh = (xn - xn.mean(0)) * inv
        dx = (dyn - dyn.mean(0) - xh * (dyn * xh).mean(0)) * inv
        return torch.from_numpy(dx), None


class InPlaceForward(torch.autograd.Function):
    """Centres x in place (x.sub_(mu)): gradcheck used to end in autograd's raw RuntimeError."""

    @staticmethod
    def forward(x, eps):
        mu, inv_std = _stats(x, eps)
        x.sub_(mu)
        return x * inv_std

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        mu, inv_std = _stats(x, ctx.eps)
        return _compact(dy, (x - mu) * inv_std, inv_std), None


class DetachInBackward(torch.autograd.Function):
    """Saves x as told, but recomputes x_hat from x.detach(): dx is right, its derivative in x is lost."""

    @staticmethod
    def forward(x, eps):
        mu, inv_std = _stats(x, eps)
        return (x - mu) * inv_std

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        x = x.detach()
        mu, inv_std = _stats(x, ctx.eps)
        return _compact(dy, (x - mu) * inv_std, inv_std), None


class ReturnsTuple(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        mu, inv_std = _stats(x, eps)
        return (x - mu) * inv_std, inv_std

    @staticmethod
    def backward(ctx, dy, dinv):
        return dy, None


@pytest.mark.parametrize("cls", [Good, GoodOldStyle, make()])
def test_accepts_correct(cls, capsys):
    assert check_normalize_function(cls) is True
    assert "all 3 cases pass" in capsys.readouterr().out


def _unbiased(x, eps):
    return (x - x.mean(0)) / (x.var(0, correction=1) + eps).sqrt()


@pytest.mark.parametrize("cls, expected", [
    (make(lambda dy, xh, s: dy * s), "both correction terms are missing"),
    (make(lambda dy, xh, s: (dy - xh * (dy * xh).mean(0)) * s), "the mean term is missing"),
    (make(lambda dy, xh, s: (dy - dy.mean(0)) * s), "the projection term is missing"),
    (make(lambda dy, xh, s: (dy - dy.sum(0) - xh * (dy * xh).sum(0)) * s), "you summed where the formula averages"),
    (make(lambda dy, xh, s: (dy - dy.mean(0) + xh * (dy * xh).mean(0)) * s), "wrong sign"),
    (make(lambda dy, xh, s: (dy - dy.mean(0) - xh * (dy * xh).mean(0)) / s), "multiplied by sigma"),
    (make(save="x_hat"), "exactly zero"),
    (make(save="x_and_inv_std"), "as a constant"),
    (make(n_grads=1), "(dx, None)"),
    (make(forward_fn=_unbiased), "unbiased variance"),
    (make(forward_fn=lambda x, eps: (x - x.mean(0)) / (x.var(0, correction=0).sqrt() + eps)), "eps is outside"),
    (make(forward_fn=lambda x, eps: (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, correction=0) + eps).sqrt()),
     "over dim 1"),
    (make(forward_fn=lambda x, eps: x / (x.var(0, correction=0) + eps).sqrt()), "did not subtract the mean"),
    (make(forward_fn=lambda x, eps: x.mean(0)), "x_hat has shape (3,), expected (8, 3)"),
    (make(out_dtype=torch.float64), "x_hat has dtype torch.float64, expected torch.float32"),
    (NumpyBackward, "dx has no grad_fn"),
    (ReturnsTuple, "returned a tuple"),
    (InPlaceForward, "modified x in place"),
    (DetachInBackward, "your backward uses .detach() on x"),
    (lambda x, eps: x, "subclass of torch.autograd.Function"),
])
def test_diagnoses(cls, expected, capsys):
    assert check_normalize_function(cls) is False
    out = capsys.readouterr().out
    assert expected in out, out
    assert "Traceback" not in out


def test_detach_is_not_told_to_save_x(capsys):
    """The reader who saved x and used .detach() must not be told to 'save the input x', which they did."""
    assert check_normalize_function(DetachInBackward) is False
    out = capsys.readouterr().out
    assert "Save the input x" not in out and ".detach()" in out, out


def test_harness_turns_autograd_inplace_error_into_a_diagnosis(capsys):
    """autograd's 'modified by an inplace operation' (raised inside the reader's code) is named, not a traceback."""
    from bnlib.exercises.harness import Case, run

    def exp_then_shift(x):
        x = x.clone().requires_grad_(True)
        y = x.exp()
        y.add_(1.0)           # exp saved its output for backward
        y.sum().backward()
        return x.grad

    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert run(exp_then_shift, [Case("A", (x,), x.exp())], inputs=("x",), outputs=("grad",)) is False
    out = capsys.readouterr().out
    assert "case A: you modified x in place" in out and "Traceback" not in out, out
