"""Checkers for the coding exercises, one module per chapter.

Each checker runs the reader's function on several cases against the reference implementation, prints a
precise diagnosis of the first failure (which case, which output, the largest error, the likely cause) and
returns True or False. Imported lazily, so a NumPy-only chapter does not pay for torch.

Every checker runs on one harness, :mod:`bnlib.exercises.harness` (safe call, mutation of the inputs, return
type, tuple length, shape, dtype, values, then the checker's table of recognised mistakes, in one wording); a
chapter's module declares only its cases, its reference and its mistakes.

Defined in: chapters/01_why_normalize.ipynb, chapters/02_bn_transform.ipynb, chapters/03_bn_backward.ipynb,
chapters/04_train_vs_inference.ipynb, chapters/05_bn_conv.ipynb, chapters/06_bn_pytorch.ipynb,
chapters/07_mnist.ipynb, chapters/08_small_batches.ipynb, chapters/09_sync_bn.ipynb, chapters/10_why_bn.ipynb
(the "Exercises" section of each).
"""

from importlib import import_module

_WHERE = {
    "check_standardize": "ch01",
    "check_batchnorm_forward": "ch02",
    "check_bn_backward": "ch03",
    "check_numerical_gradient": "ch03",
    "check_update_running_stats": "ch04",
    "check_fold_bn_into_linear": "ch04",
    "check_bn2d_forward": "ch05",
    "check_fold_bn": "ch05",
    "check_normalize_function": "ch06",
    "check_per_seed_batch_norm": "ch07",
    "check_group_norm": "ch08",
    "check_adapt_bn": "ch08",
    "check_merge_stats": "ch09",
    "check_sync_dx": "ch09",
    "check_gradient_change": "ch10",
    "check_effective_beta": "ch10",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
