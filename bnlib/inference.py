"""Training versus inference: the statistics a trained batch-norm network uses at inference.

The chapter trains a small NumPy MLP (:class:`bnlib.layers.MLP`, Linear -> BatchNorm -> ReLU, on
:func:`bnlib.data.mnist_features`) and compares the running estimates (exponential moving averages) with
population statistics recomputed after training:

* :func:`recompute_population_stats`: the paper's Algorithm 2 (average the mini-batch means and the unbiased
  mini-batch variances of the trained network, i.e. ``momentum=None`` over one pass in training mode, as
  ``torch.optim.swa_utils.update_bn`` does), or the exact full-data statistics of the inference network,
  layer by layer.

Defined in: chapters/04_train_vs_inference.ipynb
"""

from __future__ import annotations

import numpy as np

from bnlib.layers import MLP

__all__ = ["recompute_population_stats"]


def recompute_population_stats(model: MLP, X, method: str = "batches", batch_size: int = 60,
                               seed: int = 0) -> None:
    """Replace every BatchNorm's running_mean/running_var by population statistics over X, in place.

    method="batches": the paper's Algorithm 2. The trained network runs in training mode (each layer
        normalised with its batch statistics) over the mini-batches of one seeded permutation of X (the
        incomplete last batch dropped), and each layer stores the plain average of its batch means and of
        its unbiased batch variances, m/(m-1) E_B[sigma_B^2]: BatchNorm with momentum=None (a cumulative
        average) does exactly this, like torch.optim.swa_utils.update_bn. No parameter changes.
    method="exact": the inference network, layer by layer: the input of BN k is computed over all of X
        with BNs 0..k-1 already in eval mode with their exact statistics, and BN k gets its mean and
        unbiased variance (float64, then stored in the layer's dtype).

    The model's mode and momentum are restored; num_batches_tracked counts the batches (method="batches")
    or is left unchanged (method="exact").

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    was_training = model.training
    bns = model.bns
    if method == "batches":
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        perm = np.random.default_rng(seed).permutation(len(X))
        for k in range(len(X) // batch_size):
            model.forward(X[perm[k * batch_size:(k + 1) * batch_size]])
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    elif method == "exact":
        model.eval()
        for k, bn in enumerate(bns):
            z = np.concatenate([model.forward(X[i:i + 10000], upto=k) for i in range(0, len(X), 10000)])
            z = z.astype(np.float64)
            bn.running_mean[...] = z.mean(axis=0)
            bn.running_var[...] = z.var(axis=0, ddof=1)
    else:
        raise ValueError(f"method must be 'batches' or 'exact', got {method!r}")
    model.train(was_training)
