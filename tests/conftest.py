"""Shared fixtures for the bnlib unit tests."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread avoids thread-pool waits on a busy machine; restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
