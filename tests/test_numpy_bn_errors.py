"""Every error: same exception type and message as torch for the same mistake.

torch's message is obtained in each test by making the mistake with torch.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlib.numpy_bn import BatchNorm, batch_norm_forward, batch_norm_inference

TORCH_CLASS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torch_error(fn):
    """(exception type, message) raised by fn, which must raise."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we want whatever torch raises
        return type(e), str(e)
    raise AssertionError("torch did not raise")


def assert_same_error(torch_fn, ours_fn):
    etype, message = torch_error(torch_fn)
    with pytest.raises(Exception) as info:
        ours_fn()
    assert type(info.value) is etype
    assert str(info.value) == message
    return message


def pair(num_features, ndim, training=True, **kw):
    tm = TORCH_CLASS[ndim](num_features, **kw, dtype=torch.float64).train(training)
    nm = BatchNorm(num_features, **kw, dtype=np.float64).train(training)
    return tm, nm


ONE_VALUE_SHAPES = [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)]


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
def test_one_value_per_channel_in_training(shape):
    x = np.ones(shape)
    tm, nm = pair(3, len(shape))
    message = assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))
    assert message.endswith(f"torch.Size({list(shape)})")
    assert_same_error(lambda: F.batch_norm(torch.from_numpy(x), None, None, training=True),
                      lambda: batch_norm_forward(x, None, None))


def test_one_value_per_channel_in_eval_without_running_stats():
    """Untracked: batch statistics also in eval, so torch raises there too."""
    x = np.ones((1, 3))
    tm, nm = pair(3, 2, training=False, track_running_stats=False)
    assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))


@pytest.mark.parametrize("shape", [(1, 3, 5), (1, 3, 2, 1), (2, 3)], ids=str)
def test_more_than_one_value_per_channel_is_fine(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    tm, nm = pair(3, len(shape))
    expected = tm(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(nm(x), expected, atol=1e-10)


def test_one_value_per_channel_is_fine_in_eval():
    x = np.ones((1, 3))
    tm, nm = pair(3, 2, training=False)
    np.testing.assert_allclose(nm(x), tm(torch.from_numpy(x)).detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kw", [{}, {"track_running_stats": False}, {"affine": False}],
                         ids=["tracked", "untracked", "no-affine"])
def test_wrong_channel_count(kw, training):
    x = np.random.default_rng(1).standard_normal((4, 5, 2))
    tm, nm = pair(3, 3, training=training, **kw)
    assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))


def test_wrong_channel_count_no_affine_no_tracking_is_not_an_error():
    x = np.random.default_rng(2).standard_normal((4, 5, 2))
    tm, nm = pair(3, 3, affine=False, track_running_stats=False)
    np.testing.assert_allclose(nm(x), tm(torch.from_numpy(x)).numpy(), atol=1e-10)


def test_batch_size_is_checked_before_channel_count():
    x = np.ones((1, 5))
    tm, nm = pair(3, 2)
    message = assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))
    assert "value per channel" in message


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_wrong_gamma_or_beta_size(which):
    x = np.random.default_rng(3).standard_normal((4, 5))
    params = {"weight": np.ones(5), "bias": np.zeros(5)}
    params[which] = np.ones(3)
    tw, tb = (torch.from_numpy(params[k]) for k in ("weight", "bias"))
    assert_same_error(lambda: F.batch_norm(torch.from_numpy(x), None, None, tw, tb, training=True),
                      lambda: batch_norm_forward(x, params["weight"], params["bias"]))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_inference_wrong_statistics_size(which):
    x = np.random.default_rng(4).standard_normal((4, 5))
    stats = {"running_mean": np.zeros(5), "running_var": np.ones(5)}
    stats[which] = np.ones(3)
    rm, rv = (torch.from_numpy(stats[k]) for k in ("running_mean", "running_var"))
    assert_same_error(lambda: F.batch_norm(torch.from_numpy(x), rm, rv, training=False),
                      lambda: batch_norm_inference(x, stats["running_mean"], stats["running_var"],
                                                   None, None))


@pytest.mark.parametrize("eps", [0.0, 0, -1e-3], ids=["0.0", "int 0", "-1e-3"])
def test_eps_not_positive_in_training(eps):
    x = np.random.default_rng(5).standard_normal((4, 3))
    tm, nm = pair(3, 2, eps=eps)
    message = assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))
    assert message == f"batch_norm eps must be positive during training, but got {eps}"
    assert_same_error(lambda: F.batch_norm(torch.from_numpy(x), None, None, training=True, eps=eps),
                      lambda: batch_norm_forward(x, None, None, eps=eps))


def test_eps_negative_in_eval():
    x = np.random.default_rng(6).standard_normal((4, 3))
    tm, nm = pair(3, 2, training=False, eps=-1e-3)
    message = assert_same_error(lambda: tm(torch.from_numpy(x)), lambda: nm(x))
    assert message == "batch_norm eps must be non-negative, but got -0.001"
    assert_same_error(
        lambda: F.batch_norm(torch.from_numpy(x), torch.zeros(3, dtype=torch.float64),
                             torch.ones(3, dtype=torch.float64), training=False, eps=-1e-3),
        lambda: batch_norm_inference(x, np.zeros(3), np.ones(3), None, None, eps=-1e-3))


def test_eps_zero_in_eval_is_fine():
    x = np.random.default_rng(7).standard_normal((4, 3))
    tm, nm = pair(3, 2, training=False, eps=0.0)
    np.testing.assert_allclose(nm(x), tm(torch.from_numpy(x)).detach().numpy(), atol=1e-12)


def test_mixed_dtype_message_starts_with_torchs():
    x = np.random.default_rng(8).standard_normal((4, 3))  # float64 into a float32 layer
    tm = torch.nn.BatchNorm1d(3)
    etype, message = torch_error(lambda: tm(torch.from_numpy(x)))
    with pytest.raises(etype) as info:
        BatchNorm(3)(x)
    assert str(info.value).startswith(message)
    assert "float64" in str(info.value) and "dtype=" in str(info.value)  # says what to do


def test_mixed_dtype_is_checked_after_batch_size():
    x = np.ones((1, 3))  # float64 and one value per channel
    assert_same_error(lambda: torch.nn.BatchNorm1d(3)(torch.from_numpy(x)), lambda: BatchNorm(3)(x))


# Mistakes without a torch equivalent (torch tensors cannot be 'int arrays of the wrong
# shape' in the same way): a clear message naming the dtype or shape and what to do.

@pytest.mark.parametrize("fn", [lambda x: batch_norm_forward(x, None, None), lambda x: BatchNorm(3)(x)],
                         ids=["functional", "layer"])
def test_integer_input_is_a_type_error_naming_the_dtype(fn):
    with pytest.raises(TypeError, match=r"got dtype int64.*astype\(np.float32\)"):
        fn(np.ones((4, 3), dtype=np.int64))


@pytest.mark.parametrize("shape", [(), (3,)], ids=str)
@pytest.mark.parametrize("fn", [lambda x: batch_norm_forward(x, None, None), lambda x: BatchNorm(3)(x)],
                         ids=["functional", "layer"])
def test_fewer_than_two_dims_is_a_value_error_naming_the_shape(fn, shape):
    with pytest.raises(ValueError, match=rf"got shape {__import__('re').escape(str(shape))}"):
        fn(np.ones(shape))


def test_dy_of_wrong_shape():
    from bnlib.numpy_bn import batch_norm_backward

    _, cache = batch_norm_forward(np.random.default_rng(9).standard_normal((4, 3)), None, None)
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(4, 3\), got \(3, 4\)"):
        batch_norm_backward(np.ones((3, 4)), cache)
