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

    Defined in: chapters/01_why_normalize.ipynb
    """
    random.seed(seed)
    np.random.seed(seed)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    return np.random.default_rng(seed)


def set_threads(n: int = 1) -> None:
    """Pin BLAS and torch intra-op threads to ``n``.

    Small matrices run faster and with less noise on one thread; timings in the book state the count.
    The environment variables reach BLAS libraries loaded later (and child processes); BLAS libraries already
    loaded (NumPy's OpenBLAS, as soon as NumPy is imported) are set through ``threadpoolctl``, and so is torch
    if imported.

    Defined in: chapters/01_why_normalize.ipynb
    """
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    threadpool_limits(limits=n, user_api="blas")  # kept: the limit is not restored (no `with`)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
