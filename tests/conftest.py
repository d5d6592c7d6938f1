"""Shared fixtures for the bnlib unit tests.

Every test starts from the same random state (``seed_everything``), whatever ran before it on the same
worker, and hypothesis runs derandomized without an example database: a test's outcome never depends on the
test order, the number of xdist workers, or an earlier run.
"""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("bnlib", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("bnlib")


@pytest.fixture(autouse=True)
def seed_everything():
    """Seed Python's, NumPy's legacy and torch's global generators before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def load_bench():
    """``load_bench("bench_torch_bn")``: a script of ``bench/`` as a module (the scripts are not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread avoids thread-pool waits on a busy machine; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["fast", "readable"])
def both_bn_paths(request):
    """Run the test on both paths of ``bnlib.torch_bn.batch_norm``: its speed path (``bnlib.torch_bn_fast``, what
    eager training uses) and, with the speed path switched off, the readable ``BatchNormFunction`` alone."""
    from bnlib import torch_bn_fast

    if request.param == "fast":
        yield
    else:
        with torch_bn_fast.disabled():
            yield


# `make test` runs two xdist workers with --dist loadfile and --no-loadscope-reorder: files are handed out in
# collection order.  The longest files go first so that neither worker is left with a long file at the end:
# the book build behind the browser test (every chapter executed once more), then the chapters with the longest
# nbval runs, then the slowest unit-test files; everything else keeps pytest's order.
FIRST = [
    "tests/test_rendered_book.py",
    "chapters/07_mnist.ipynb",
    "chapters/09_sync_bn.ipynb",
    "chapters/06_bn_pytorch.ipynb",
    "chapters/appendix_performance.ipynb",
    "chapters/10_why_bn.ipynb",
    "tests/test_torch_bn_compile.py",
    "tests/test_results.py",
]


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return FIRST.index(path) if path in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept
