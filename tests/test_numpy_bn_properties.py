"""Property-based tests (hypothesis) of bnlib.numpy_bn over shapes and scales, float64."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib.gradcheck import check_gradients, rel_error
from bnlib.numpy_bn import (
    batch_norm_backward,
    batch_norm_backward_staged,
    batch_norm_forward,
    batch_norm_inference,
)

# derandomize: the examples are a fixed function of the test (no flaky runs); database=None: no
# examples replayed from earlier runs, so every run tests the same cases
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)


@st.composite
def batches(draw, max_spatial_dims=3, max_size=5, scales=(1e-2, 1.0, 1e2), offsets=(-1e2, 1e2),
            min_values=2):
    """(x, dy, gamma, beta, eps) with x of shape (N, C, *spatial), at least min_values values
    per channel.

    With M = 2 values per channel, dx is 0 up to eps (x_hat = +-1 whatever x is), pure
    round-off: relative comparisons of dx need M >= 3.
    """
    n = draw(st.integers(1, max_size))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, max_size), max_size=max_spatial_dims))
    per_sample = int(np.prod(spatial))
    if n * per_sample < min_values:
        n = -(-min_values // per_sample)
    shape = (n, c, *spatial)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(scales)) * rng.uniform(0.5, 2.0, size=(1, c) + (1,) * len(spatial))
    offset = rng.uniform(*offsets, size=(1, c) + (1,) * len(spatial))
    x = offset + scale * rng.standard_normal(shape)
    dy = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gamma = rng.normal(1.0, 1.0, c)
    beta = rng.normal(0.0, 1.0, c)
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-1]))
    return x, dy, gamma, beta, eps


def per_channel(a):
    """(N, C, *spatial) -> (C, M): the M values of each channel as a row."""
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


@SETTINGS
@given(batches())
def test_x_hat_has_mean_0_and_variance_var_over_var_plus_eps(batch):
    x, _, gamma, beta, eps = batch
    y, cache = batch_norm_forward(x, gamma, beta, eps)
    x_hat = per_channel(cache.x_hat)
    var = per_channel(x).var(axis=1)  # numpy's own biased variance
    np.testing.assert_allclose(x_hat.mean(axis=1), 0.0, atol=1e-11)
    # var(x_hat) = var / (var + eps): 1 up to eps (exactly 1 only for eps -> 0)
    np.testing.assert_allclose(x_hat.var(axis=1), var / (var + eps), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(cache.var, var, rtol=1e-10)
    np.testing.assert_allclose(per_channel(y), gamma[:, None] * x_hat + beta[:, None], rtol=1e-12,
                               atol=1e-12)


@SETTINGS
@given(batches())
def test_dx_sums_to_zero_and_is_orthogonal_to_x_hat_up_to_eps(batch):
    """Per channel: sum(dx) = 0, and sum(dx * x_hat) = gamma * inv_std * dgamma * eps / (var + eps).

    The second is 0 only for eps = 0: from the compact formula,
    sum(dx * x_hat) = gamma * inv_std * dgamma * (1 - mean(x_hat**2)), mean(x_hat**2) = var / (var + eps).
    """
    x, dy, gamma, beta, eps = batch
    _, cache = batch_norm_forward(x, gamma, beta, eps)
    dx, dgamma, _ = batch_norm_backward(dy, cache)
    dx_c, dy_c, x_hat_c = per_channel(dx), per_channel(dy), per_channel(cache.x_hat)
    a = np.abs(gamma * cache.inv_std)
    # round-off scale: the size of the terms dx is made of, summed over the channel
    size = a * (np.abs(dy_c).sum(axis=1) + np.abs(dy_c * x_hat_c).sum(axis=1)) + 1e-300
    assert np.all(np.abs(dx_c.sum(axis=1)) <= 1e-12 * size)
    var = per_channel(x).var(axis=1)
    expected = gamma * cache.inv_std * dgamma * eps / (var + eps)
    assert np.all(np.abs((dx_c * x_hat_c).sum(axis=1) - expected) <= 1e-11 * size * (1 + np.abs(x_hat_c).max()))


@SETTINGS
@given(batches(min_values=3), st.sampled_from([(True, True), (False, False), (True, False)]))
def test_staged_equals_compact(batch, affine):
    x, dy, gamma, beta, eps = batch
    gamma = gamma if affine[0] else None
    beta = beta if affine[1] else None
    _, cache = batch_norm_forward(x, gamma, beta, eps)
    compact = batch_norm_backward(dy, cache)
    staged = batch_norm_backward_staged(dy, cache)
    assert rel_error(compact[0], staged[0]) < 1e-10
    for a, b, given_param in ((compact[1], staged[1], gamma), (compact[2], staged[2], beta)):
        assert (a is None) == (b is None) == (given_param is None)
        if a is not None:
            assert rel_error(a, b) < 1e-12


@SETTINGS
@given(batches())
def test_staged_equals_compact_in_inference(batch):
    x, dy, gamma, beta, eps = batch
    c = x.shape[1]
    rng = np.random.default_rng(0)
    _, cache = batch_norm_inference(x, rng.normal(size=c), rng.uniform(0.1, 3.0, c), gamma, beta, eps)
    for a, b in zip(batch_norm_backward(dy, cache), batch_norm_backward_staged(dy, cache)):
        assert rel_error(a, b) < 1e-13


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(batches(max_spatial_dims=2, max_size=3, scales=(0.5, 1.0, 3.0), offsets=(-5.0, 5.0),
               min_values=3))
def test_gradients_agree_with_central_differences(batch):
    x, dy, gamma, beta, eps = batch
    dy = dy / np.abs(dy).max()
    _, cache = batch_norm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    errors = check_gradients(
        lambda x, gamma, beta: batch_norm_forward(x, gamma, beta, eps)[0],
        {"x": x, "gamma": gamma, "beta": beta},
        {"x": dx, "gamma": dgamma, "beta": dbeta},
        dy,
    )
    assert max(errors.values()) < 1e-7, errors


def test_every_property_test_is_deterministic():
    """derandomize=True and database=None on every hypothesis test of this module."""
    tests = [f for name, f in globals().items() if name.startswith("test_") and hasattr(f, "hypothesis")]
    assert len(tests) == 5
    for f in tests:
        used = f._hypothesis_internal_use_settings
        assert used.derandomize is True and used.database is None, f.__name__
