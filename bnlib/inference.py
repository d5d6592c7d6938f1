"""Training versus inference: a small NumPy MLP with batch norm, and the statistics used at inference.

The chapter trains a tiny network with :class:`bnlib.numpy_bn.BatchNorm` and compares the running estimates
(exponential moving averages) with population statistics recomputed after training.

* :func:`mnist_features`: MNIST images average-pooled to 14x14 (196 features in [0, 1]), as NumPy arrays.
* :class:`Linear`, :class:`ReLU`, :class:`MLP`: forward/backward pairs (CS231n style); the MLP is
  Linear -> BatchNorm -> ReLU per hidden layer (the hidden Linear layers have no bias: BN's beta replaces it).
* :func:`softmax_cross_entropy`, :func:`train_mlp` (plain SGD, a seeded permutation per epoch),
  :func:`predict`, :func:`accuracy`.
* :func:`recompute_population_stats`: the paper's Algorithm 2 (average the mini-batch means and the unbiased
  mini-batch variances of the trained network, i.e. ``momentum=None`` over one pass in training mode, as
  ``torch.optim.swa_utils.update_bn`` does), or the exact full-data statistics of the inference network,
  layer by layer.

Defined in: chapters/04_train_vs_inference.ipynb
"""

from __future__ import annotations

import numpy as np

from bnlib.numpy_bn import BatchNorm

__all__ = [
    "mnist_features",
    "Linear",
    "ReLU",
    "MLP",
    "softmax_cross_entropy",
    "train_mlp",
    "predict",
    "accuracy",
    "recompute_population_stats",
]


def mnist_features(train: bool = True, pool: int = 2, root=None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as NumPy arrays: X (N, (28/pool)**2) float32 in [0, 1], y (N,) int64.

    Each image is average-pooled over pool x pool blocks (pool=2: 14x14 = 196 features), which keeps the
    chapter's training runs to about a second. N = 60,000 (train) or 10,000 (test). The raw IDX files are
    provisioned by :func:`bnlib.data.provision_mnist` and read directly with NumPy (no torchvision import).

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    from bnlib.data import default_root, provision_mnist

    raw = provision_mnist(root if root is not None else default_root(), verbose=False) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = np.fromfile(raw / f"{prefix}-images-idx3-ubyte", dtype=np.uint8, offset=16)
    labels = np.fromfile(raw / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    N, H, W = len(labels), 28, 28
    if H % pool or W % pool:
        raise ValueError(f"pool={pool} must divide the image size {H}x{W}")
    images = images.reshape(N, H // pool, pool, W // pool, pool)
    pooled = images.mean(axis=(2, 4), dtype=np.float32)
    X = (pooled / np.float32(255.0)).reshape(N, -1)
    return np.ascontiguousarray(X, dtype=np.float32), labels.astype(np.int64)


class Linear:
    """y = x @ W.T + b, with W of shape (out, in) like torch.nn.Linear; b is None when bias=False.

    forward(x (N, in)) -> (N, out); backward(dy (N, out)) -> dx (N, in), storing dW (out, in) and db (out,).
    Weights are drawn from N(0, 2 / in) (He initialisation for ReLU networks).

    Defined in: chapters/04_train_vs_inference.ipynb
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True, rng=None, dtype=np.float32):
        rng = np.random.default_rng(0) if rng is None else rng
        self.W = (rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_out, n_in))).astype(dtype)
        self.b = np.zeros(n_out, dtype) if bias else None
        self.dW = self.db = None
        self._x = None

    def forward(self, x):
        self._x = x
        y = x @ self.W.T
        return y if self.b is None else y + self.b

    def backward(self, dy):
        self.dW = dy.T @ self._x
        self.db = None if self.b is None else dy.sum(axis=0)
        return dy @ self.W

    def params(self):
        """[(parameter, gradient), ...] for the optimiser."""
        return [(self.W, self.dW)] + ([] if self.b is None else [(self.b, self.db)])


class ReLU:
    """y = max(x, 0); backward(dy) = dy * (x > 0).

    Defined in: chapters/04_train_vs_inference.ipynb
    """

    def forward(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)

    def params(self):
        return []


class MLP:
    """sizes[0] -> ... -> sizes[-1]: (Linear -> BatchNorm -> ReLU) per hidden layer, then a Linear.

    With bn=False the hidden Linear layers get a bias and there is no BatchNorm. ``train()``/``eval()`` set
    the mode of every BatchNorm; ``bns`` lists them in order. forward(x (N, sizes[0])) -> logits;
    backward(dlogits) stores every gradient; ``sgd_step(lr)`` applies them.

    Defined in: chapters/04_train_vs_inference.ipynb
    """

    def __init__(self, sizes=(196, 100, 100, 10), bn: bool = True, momentum=0.1, eps: float = 1e-5,
                 seed: int = 0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.layers = []
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            self.layers.append(Linear(n_in, n_out, bias=not bn, rng=rng, dtype=dtype))
            if bn:
                self.layers.append(BatchNorm(n_out, eps=eps, momentum=momentum, dtype=dtype))
            self.layers.append(ReLU())
        self.layers.append(Linear(sizes[-2], sizes[-1], bias=True, rng=rng, dtype=dtype))
        self.training = True

    @property
    def bns(self) -> list[BatchNorm]:
        return [layer for layer in self.layers if isinstance(layer, BatchNorm)]

    @property
    def linears(self) -> list[Linear]:
        return [layer for layer in self.layers if isinstance(layer, Linear)]

    def train(self, mode: bool = True) -> MLP:
        self.training = bool(mode)
        for bn in self.bns:
            bn.train(mode)
        return self

    def eval(self) -> MLP:
        return self.train(False)

    def forward(self, x, upto: int | None = None):
        """Logits; with ``upto=k``, the input of the k-th BatchNorm instead (the layers before it applied)."""
        k = 0
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                if k == upto:
                    return x
                k += 1
            x = layer.forward(x)
        if upto is not None:
            raise IndexError(f"upto={upto}, but the network has {k} BatchNorm layers")
        return x

    __call__ = forward

    def backward(self, dlogits):
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def params(self):
        """[(parameter, gradient), ...] of every layer (BatchNorm: weight/dweight, bias/dbias)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                if layer.affine:
                    out += [(layer.weight, layer.dweight), (layer.bias, layer.dbias)]
            else:
                out += layer.params()
        return out

    def sgd_step(self, lr: float) -> None:
        for p, g in self.params():
            p -= np.asarray(lr * g, dtype=p.dtype)


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy of integer labels y (N,) under softmax(logits (N, K)); returns (loss, dlogits).

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    N = logits.shape[0]
    loss = -float(log_p[np.arange(N), y].mean())
    dlogits = np.exp(log_p)
    dlogits[np.arange(N), y] -= 1
    return loss, (dlogits / N).astype(logits.dtype, copy=False)


def train_mlp(model: MLP, X, y, steps: int, batch_size: int = 60, lr: float = 0.1, seed: int = 0,
              callback=None) -> list[float]:
    """Plain SGD on mini-batches drawn from a fresh seeded permutation each epoch; returns the losses.

    ``callback(step, model, xb)`` (if given) runs after each update, step = 1, 2, ...; xb is the batch used.
    The model is put in training mode.

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    rng = np.random.default_rng(seed)
    per_epoch = len(X) // batch_size
    model.train()
    losses = []
    perm = None
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            perm = rng.permutation(len(X))
        idx = perm[k * batch_size:(k + 1) * batch_size]
        xb = X[idx]
        loss, dlogits = softmax_cross_entropy(model.forward(xb), y[idx])
        model.backward(dlogits)
        model.sgd_step(lr)
        losses.append(loss)
        if callback is not None:
            callback(step + 1, model, xb)
    return losses


def predict(model: MLP, X, batch_size: int | None = 1000):
    """Logits of X in consecutive chunks of ``batch_size`` (None: one chunk), in the model's current mode.

    In training mode every chunk is normalised with its own statistics and updates the running estimates:
    that is the "forgot eval()" pitfall, reproduced on purpose in the chapter.

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    n = len(X)
    bs = n if batch_size is None else batch_size
    return np.concatenate([model.forward(X[i:i + bs]) for i in range(0, n, bs)])


def accuracy(model: MLP, X, y, batch_size: int | None = 1000) -> float:
    """Fraction of correct predictions of :func:`predict` (in the model's current mode).

    Defined in: chapters/04_train_vs_inference.ipynb
    """
    return float((predict(model, X, batch_size).argmax(axis=1) == y).mean())


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
