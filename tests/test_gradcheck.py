"""bnlib.gradcheck: numerical gradients of known functions, the rel_error definition."""

import numpy as np
import pytest
import torch

from bnlib.gradcheck import check_gradients, numerical_gradient, rel_error
from bnlib.numpy_bn import batch_norm_backward, batch_norm_forward


def test_gradient_of_scalar_function():
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]])
    grad = numerical_gradient(lambda v: np.sum(v**3), x)
    np.testing.assert_allclose(grad, 3 * x**2, rtol=1e-8, atol=1e-10)


def test_gradient_of_array_function_with_upstream_dy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    dy = rng.standard_normal((3, 4))
    grad = numerical_gradient(np.sin, x, dy)
    np.testing.assert_allclose(grad, np.cos(x) * dy, rtol=1e-8, atol=1e-10)


def test_dy_none_means_gradient_of_the_sum():
    x = np.linspace(-1.0, 1.0, 5)
    grad = numerical_gradient(lambda v: v**2, x)  # array-valued, no dy: d sum(v**2) / dv
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-8, atol=1e-10)


def test_output_of_another_shape_and_matrix_function():
    rng = np.random.default_rng(1)
    w, x, dy = rng.standard_normal((2, 4)), rng.standard_normal(4), rng.standard_normal(2)
    np.testing.assert_allclose(numerical_gradient(lambda v: w @ v, x, dy), w.T @ dy, rtol=1e-8)


def test_x_is_restored_exactly_also_when_f_raises():
    x = np.random.default_rng(2).standard_normal((2, 3))
    original = x.copy()
    numerical_gradient(lambda v: np.sum(np.exp(v)), x)
    np.testing.assert_array_equal(x, original)
    calls = []

    def fails_on_third_call(v):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return np.sum(v)

    with pytest.raises(RuntimeError, match="boom"):
        numerical_gradient(fails_on_third_call, x)
    np.testing.assert_array_equal(x, original)


def test_f_sees_the_perturbed_x_in_place():
    x = np.zeros(3)
    seen = []
    numerical_gradient(lambda v: seen.append(v.copy()) or 0.0, x, h=0.5)
    assert [s.tolist() for s in seen[:2]] == [[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]


def test_needs_a_float_array():
    with pytest.raises(TypeError):
        numerical_gradient(np.sum, np.arange(3))
    with pytest.raises(TypeError):
        numerical_gradient(np.sum, [1.0, 2.0])


def test_rel_error_definition():
    a = np.array([1.0, -2.0, 0.0])
    b = np.array([1.0, -2.5, 1e-3])
    # max |a - b| / max(|a| + |b|) = 0.5 / 4.5
    assert rel_error(a, b) == pytest.approx(0.5 / 4.5, rel=1e-15)
    assert rel_error(a, a) == 0.0
    assert rel_error(np.zeros(4), np.zeros(4)) == 0.0
    assert rel_error(3.0, 1.0) == pytest.approx(0.5)
    assert rel_error(1e-30 * a, 1e-30 * b) == pytest.approx(rel_error(a, b))  # scale invariant
    assert rel_error(a, b) == rel_error(b, a)
    assert rel_error(np.array([1.0]), np.array([-1.0])) == 1.0  # the maximum
    # an elementwise ratio would give 1 for the third entry; the normwise error does not
    assert rel_error(np.array([1.0, 1e-20]), np.array([1.0, 0.0])) < 1e-19


def test_rel_error_refuses_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        rel_error(np.ones(3), np.ones((3, 1)))


def test_check_gradients_on_batch_norm_and_detects_a_wrong_gradient():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (4, 3, 2))
    gamma, beta = rng.normal(1.0, 0.5, 3), rng.normal(0.0, 0.5, 3)
    dy = rng.standard_normal(x.shape)
    _, cache = batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    inputs = {"x": x, "gamma": gamma, "beta": beta}
    copies = {k: v.copy() for k, v in inputs.items()}

    def f(x, gamma, beta):
        return batch_norm_forward(x, gamma, beta)[0]

    errors = check_gradients(f, inputs, {"x": dx, "gamma": dgamma, "beta": dbeta}, dy)
    assert set(errors) == {"x", "gamma", "beta"}
    assert max(errors.values()) < 1e-8, errors
    for k in inputs:
        np.testing.assert_array_equal(inputs[k], copies[k])
    # a gradient that forgets the mean's path (dx = gamma * inv_std * dy) is caught
    wrong = check_gradients(f, inputs, {"x": dy * (gamma * cache.inv_std)[:, None]}, dy)
    assert wrong["x"] > 1e-2


def test_numerical_gradient_matches_torch_autograd():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2))
    dy = rng.standard_normal((3, 2))
    xt = torch.tensor(x, requires_grad=True)
    (torch.tanh(xt) * xt.sum(0)).backward(torch.from_numpy(dy))
    grad = numerical_gradient(lambda v: np.tanh(v) * v.sum(0), x, dy)
    assert rel_error(grad, xt.grad.numpy()) < 1e-9
