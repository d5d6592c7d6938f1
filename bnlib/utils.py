"""Seeds and thread settings shared by every chapter, so that re-running a notebook reproduces it.

Defined in: chapters/01_why_normalize.ipynb
"""

from __future__ import annotations

import os
import random

import numpy as np


def set_seed(seed: int = 0) -> np.random.Generator:
    """Seed Python's, NumPy's and (if imported) torch's global generators.

    Returns a fresh ``np.random.Generator(PCG64(seed))`` for code that prefers an explicit generator.
    torch is seeded only when it is already imported, so NumPy-only chapters do not pay its import.
    """
    random.seed(seed)
    np.random.seed(seed)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    return np.random.default_rng(seed)


def _openblas_set_num_threads(n: int) -> bool:
    """Set the thread count of every OpenBLAS already loaded in this process (NumPy's wheel bundles one)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    except OSError:  # not Linux: fall back to the environment variables alone
        return False
    done = False
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                       "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def set_threads(n: int = 1) -> None:
    """Pin BLAS and torch intra-op threads to ``n``.

    Small matrices run faster and with less noise on one thread; timings in the book state the count.
    The environment variables reach BLAS libraries loaded later (and child processes); OpenBLAS libraries
    already loaded (NumPy's, as soon as NumPy is imported) are set directly, and so is torch if imported.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    _openblas_set_num_threads(n)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
