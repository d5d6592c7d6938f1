"""bnlib.utils: seeds reproduce, and set_threads reaches NumPy's already-loaded OpenBLAS."""

import subprocess
import sys

import numpy as np


def test_set_seed_reproduces_numpy_and_torch():
    import torch

    from bnlib.utils import set_seed

    g1 = set_seed(3)
    a = (np.random.rand(3), g1.normal(size=3), torch.rand(3))
    g2 = set_seed(3)
    b = (np.random.rand(3), g2.normal(size=3), torch.rand(3))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_set_threads_changes_the_loaded_openblas():
    # In a fresh interpreter (NumPy already imported, its OpenBLAS loaded), ask OpenBLAS itself.
    code = """
import ctypes, numpy
from bnlib.utils import set_threads
libs = {l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.lower() and l.rstrip().endswith('.so')}
lib = ctypes.CDLL(sorted(libs)[0])
get = getattr(lib, 'scipy_openblas_get_num_threads64_', None) or getattr(lib, 'openblas_get_num_threads')
set_threads(1); one = get()
set_threads(2); two = get()
print(one, two)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PATH": ""})
    assert out.stdout.split() == ["1", "2"]
