"""Shared fixtures for the bnlib unit tests.

Every test starts from the same random state (``seed_everything``), whatever ran before it on the same
worker, and hypothesis runs derandomized without an example database: a test's outcome never depends on the
test order, the number of xdist workers, or an earlier run.
"""

import random

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread avoids thread-pool waits on a busy machine; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
