"""NumPy layers with forward/backward pairs (CS231n style), the one set every NumPy network of the book uses.

* :func:`sigmoid` (chapter 1's networks) and :class:`ReLU` (chapter 4's), activations;
* :class:`Linear`: y = x @ W.T + b with W of shape (out, in), torch.nn.Linear's layout (chapter 1's
  :class:`bnlib.motivation.SigmoidMLP` stores its weights the same way);
* :class:`BatchNorm`: the layer of :mod:`bnlib.numpy_bn`, re-exported so a network imports its layers from
  one place;
* :func:`softmax_cross_entropy`: the loss of every classifier, with its gradient;
* :class:`MLP` (Linear -> BatchNorm -> ReLU per hidden layer), :func:`train_mlp` (plain SGD),
  :func:`predict`, :func:`accuracy`.

Defined in: chapters/01_why_normalize.ipynb (sigmoid, softmax_cross_entropy);
chapters/04_train_vs_inference.ipynb (the rest).
"""

from __future__ import annotations

import numpy as np

from bnlib.numpy_bn import BatchNorm

__all__ = [
    "sigmoid",
    "ReLU",
    "Linear",
    "BatchNorm",
    "softmax_cross_entropy",
    "MLP",
    "train_mlp",
    "predict",
    "accuracy",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-x)), computed without overflow warnings.

    Defined in: chapters/01_why_normalize.ipynb
    """
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(x, np.float32), copy=False)


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy of integer labels y (N,) under softmax(logits (N, K)); returns (loss, dlogits).

    Defined in: chapters/01_why_normalize.ipynb; used in chapters/04_train_vs_inference.ipynb
    """
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    N = logits.shape[0]
    loss = -float(log_p[np.arange(N), y].mean())
    dlogits = np.exp(log_p)
    dlogits[np.arange(N), y] -= 1
    return loss, (dlogits / N).astype(logits.dtype, copy=False)


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
