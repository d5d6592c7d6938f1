"""Why normalize? Conditioning of least squares and a deep sigmoid network whose hidden inputs drift.

Two small laboratories for the first chapter:

* least squares with gradient descent: the Hessian, its condition number, the iterations gradient
  descent needs with the best constant step size, and the path it takes;
* a fully connected sigmoid network in NumPy (the architecture of Ioffe & Szegedy's Figure 1) whose
  forward pass records every layer's input and pre-activation, so a chapter can watch the distributions
  that batch normalization will later pin down. Its pieces are :mod:`bnlib.layers`' (``sigmoid``,
  ``softmax_cross_entropy``, weights in :class:`bnlib.layers.Linear`'s (out, in) layout); chapter 7 trains the
  same network in torch (:func:`bnlib.models.mlp`, :class:`bnlib.models.BatchedMLP`). MNIST comes from
  :func:`bnlib.data.load_mnist_numpy`.

Defined in: chapters/01_why_normalize.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlib.layers import sigmoid, softmax_cross_entropy

__all__ = [
    "least_squares_loss",
    "least_squares_grad",
    "least_squares_hessian",
    "condition_number",
    "best_constant_step",
    "gd_iterations_bound",
    "gradient_descent",
    "gd_relative_gap",
    "gd_iterations",
    "sigmoid_saturation_threshold",
    "SigmoidMLP",
    "BNNoise",
    "DriftRecord",
    "train_with_recording",
]


# --------------------------------------------------------------------------------------------------
# Least squares and gradient descent
# --------------------------------------------------------------------------------------------------


def least_squares_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """L(w) = 1/(2n) ||X w - y||^2 for X of shape (n, d), y of shape (n,), w of shape (d,).

    Defined in: chapters/01_why_normalize.ipynb
    """
    r = X @ w - y
    return float(r @ r / (2 * len(y)))


def least_squares_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of :func:`least_squares_loss`: X^T (X w - y) / n, shape (d,).

    Defined in: chapters/01_why_normalize.ipynb
    """
    return X.T @ (X @ w - y) / len(y)


def least_squares_hessian(X: np.ndarray) -> np.ndarray:
    """Hessian of :func:`least_squares_loss`: H = X^T X / n, shape (d, d), independent of w and y.

    Defined in: chapters/01_why_normalize.ipynb
    """
    return X.T @ X / len(X)


def condition_number(H: np.ndarray) -> float:
    """kappa(H) = lambda_max / lambda_min of a symmetric positive definite matrix.

    Defined in: chapters/01_why_normalize.ipynb
    """
    lam = np.linalg.eigvalsh(H)
    if lam[0] <= 0:
        raise ValueError(f"H is not positive definite (smallest eigenvalue {lam[0]:.3g})")
    return float(lam[-1] / lam[0])


def best_constant_step(H: np.ndarray) -> float:
    """The constant step size that minimises GD's worst-case contraction on a quadratic: 2 / (lam_min + lam_max).

    Any step below 2 / lam_max converges; this one gives the contraction factor (kappa - 1) / (kappa + 1).

    Defined in: chapters/01_why_normalize.ipynb
    """
    lam = np.linalg.eigvalsh(H)
    return float(2.0 / (lam[0] + lam[-1]))


def gd_iterations_bound(kappa: float, tol: float) -> int:
    """The smallest k with rho^(2k) <= tol, rho = (kappa - 1)/(kappa + 1): an upper bound on best-step GD's iterations.

    With the step 2 / (lam_min + lam_max), every eigen-component of the error w_k - w* shrinks by at least
    rho per step, so the relative loss gap (L(w_k) - L*) / (L(w_0) - L*) = sum_i lam_i e_i^2 rho_i^(2k) / sum_i
    lam_i e_i^2 is at most rho^(2k). Roughly k = (kappa / 4) ln(1 / tol) for large kappa.

    Defined in: chapters/01_why_normalize.ipynb
    """
    rho = (kappa - 1.0) / (kappa + 1.0)
    if rho <= 0.0:
        return 1
    return int(np.ceil(np.log(tol) / (2.0 * np.log(rho))))


def gradient_descent(
    X: np.ndarray,
    y: np.ndarray,
    lr: float,
    w0: np.ndarray | None = None,
    tol: float = 1e-8,
    max_steps: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient descent on :func:`least_squares_loss` until the relative loss gap is below ``tol``.

    Stops at the first k with (L(w_k) - L*) / (L(w_0) - L*) <= tol, where L* comes from the exact
    least-squares solution. Returns ``(path, gaps)``: the iterates w_0..w_k, shape (k+1, d), and the relative
    loss gaps, shape (k+1,). ``len(path) - 1`` is the number of iterations. Raises RuntimeError if
    ``max_steps`` are not enough (for example a step size above 2 / lam_max, where GD diverges).

    Defined in: chapters/01_why_normalize.ipynb
    """
    d = X.shape[1]
    w = np.zeros(d) if w0 is None else np.asarray(w0, dtype=float).copy()
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]
    L_star = least_squares_loss(X, y, w_star)
    gap0 = least_squares_loss(X, y, w) - L_star
    path, gaps = [w.copy()], [1.0]
    for _ in range(max_steps):
        if gaps[-1] <= tol:
            return np.array(path), np.array(gaps)
        w = w - lr * least_squares_grad(X, y, w)
        path.append(w.copy())
        gaps.append((least_squares_loss(X, y, w) - L_star) / gap0)
    raise RuntimeError(f"gradient descent did not reach tol={tol:g} in {max_steps} steps (gap {gaps[-1]:.3g})")


def _gap_terms(X, y, lr, w0):
    lam, V = np.linalg.eigh(least_squares_hessian(X))
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]
    e0 = (np.zeros(X.shape[1]) if w0 is None else np.asarray(w0, dtype=float)) - w_star
    a = lam * (V.T @ e0) ** 2
    log_r = 2.0 * np.log(np.maximum(np.abs(1.0 - lr * lam), 1e-300))
    if np.any((a > 0) & (log_r >= 0)):
        raise RuntimeError(f"lr={lr:g} is not a stable step (2 / lam_max = {2 / lam[-1]:.4g})")
    return a / a.sum(), log_r


def gd_relative_gap(X: np.ndarray, y: np.ndarray, lr: float, k, w0: np.ndarray | None = None) -> np.ndarray:
    """The relative loss gap (L(w_k) - L*) / (L(w_0) - L*) of :func:`gradient_descent` after k steps, in closed form.

    On a quadratic the error e_k = w_k - w* evolves as e_k = (I - lr H)^k e_0, so in H's eigenbasis
    (eigenvalues lam_i, components c_i of e_0) the gap is sum_i lam_i c_i^2 (1 - lr lam_i)^(2k) / sum_i lam_i c_i^2.
    ``k`` may be an int or an array of ints; the result has its shape. Raises RuntimeError for an unstable step.

    Defined in: chapters/01_why_normalize.ipynb
    """
    a, log_r = _gap_terms(X, y, lr, w0)
    k = np.asarray(k, dtype=float)
    return (a * np.exp(k[..., None] * log_r)).sum(axis=-1)


def gd_iterations(X: np.ndarray, y: np.ndarray, lr: float, tol: float = 1e-8, w0: np.ndarray | None = None,
                  max_steps: int = 10**9) -> int:
    """The iterations :func:`gradient_descent` needs to reach ``tol``, computed in closed form instead of by running it.

    Uses :func:`gd_relative_gap`, which is non-increasing in k for a stable step: the first k with gap <= tol
    is found by doubling and bisection. Useful when kappa is so large that running GD would take minutes.
    Raises RuntimeError for an unstable step or if ``tol`` is not reached in ``max_steps``.

    Defined in: chapters/01_why_normalize.ipynb
    """
    a, log_r = _gap_terms(X, y, lr, w0)

    def gap(k: int) -> float:
        return float(np.sum(a * np.exp(k * log_r)))

    if gap(0) <= tol:
        return 0
    hi = 1
    while gap(hi) > tol:
        hi *= 2
        if hi > 2 * max_steps:
            raise RuntimeError(f"gradient descent would need more than {max_steps} steps")
    lo = hi // 2  # gap(lo) > tol >= gap(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if gap(mid) > tol else (lo, mid)
    return hi


# --------------------------------------------------------------------------------------------------
# A deep sigmoid network in NumPy that records what each layer sees
# --------------------------------------------------------------------------------------------------


def sigmoid_saturation_threshold(c: float = 0.1) -> float:
    """The |x| beyond which sigmoid'(x) = s(1 - s) falls below ``c`` (0 < c < 1/4).

    Solving s(1 - s) = c gives s = (1 + r)/2 with r = sqrt(1 - 4c), so x = log(s / (1 - s)) = log((1 + r)/(1 - r)).

    Defined in: chapters/01_why_normalize.ipynb
    """
    if not 0.0 < c < 0.25:
        raise ValueError(f"c must lie in (0, 1/4), got {c}")
    r = np.sqrt(1.0 - 4.0 * c)
    return float(np.log((1.0 + r) / (1.0 - r)))


class SigmoidMLP:
    """A fully connected network: hidden layers u_k = sigmoid(z_k), then linear logits.

    Without batch normalization the sigmoid input is z_k = u_{k-1} W_k^T + b_k; with ``bn=True`` it is
    z_k = BN(u_{k-1} W_k^T) (training-mode batch normalization from :mod:`bnlib.numpy_bn`, with learned
    ``gamma[k]``/``beta[k]``; the hidden biases stay 0 because beta replaces them), optionally perturbed as
    z_k = scale * BN(...) + shift by ``noise`` (the "noisy BatchNorm" of Santurkar et al. 2018).

    ``sizes`` lists the widths, e.g. ``[784, 100, 100, 100, 10]`` (the network of Ioffe & Szegedy's
    Figure 1). Weights are drawn from N(0, init_std^2) ("small random Gaussian values"), biases are 0.
    ``W[k]`` has shape (sizes[k+1], sizes[k]), the (out, in) layout of :class:`bnlib.layers.Linear` and
    ``torch.nn.Linear`` (the transpose of an (in, out) draw); the loss is the mean softmax cross-entropy.

    The forward pass keeps what each layer sees: ``cache["u"][k]`` is the input of layer k (u_0 = the
    data) and ``cache["x"][k]`` the input of its sigmoid, z_k (the quantity plotted in the paper's Figure 1b;
    for the output layer, the logits).

    Defined in: chapters/01_why_normalize.ipynb
    """

    def __init__(self, sizes: list[int], init_std: float = 0.1, rng: np.random.Generator | None = None,
                 dtype=np.float32, bn: bool = False):
        rng = np.random.default_rng(0) if rng is None else rng
        self.sizes = list(sizes)
        self.bn = bn
        self.W = [(init_std * rng.standard_normal((a, b))).astype(dtype).T for a, b in zip(sizes[:-1], sizes[1:])]
        self.b = [np.zeros(b, dtype=dtype) for b in sizes[1:]]
        hidden = sizes[1:-1] if bn else []
        self.gamma = [np.ones(h, dtype=dtype) for h in hidden]
        self.beta = [np.zeros(h, dtype=dtype) for h in hidden]

    def forward(self, u0: np.ndarray, noise: list | None = None) -> tuple[np.ndarray, dict]:
        """Logits (N, sizes[-1]) and a cache with the layer inputs ``u`` and sigmoid inputs ``x``.

        ``noise`` (BN networks only): one ``(scale, shift)`` pair per hidden layer, arrays broadcastable to
        (N, width), applied to the BN output before the sigmoid.
        """
        from bnlib.numpy_bn import batch_norm_forward

        u, xs, bn_caches = [u0], [], []
        L = len(self.W)
        for k in range(L):
            if k < L - 1 and self.bn:
                x, c = batch_norm_forward(u[-1] @ self.W[k].T, self.gamma[k], self.beta[k])
                bn_caches.append(c)
                if noise is not None:
                    x = x * noise[k][0] + noise[k][1]
            else:
                x = u[-1] @ self.W[k].T + self.b[k]
            xs.append(x)
            if k < L - 1:
                u.append(sigmoid(x))
        return xs[-1], {"u": u, "x": xs, "bn": bn_caches, "noise": noise}

    #: mean softmax cross-entropy and its gradient with respect to the logits: ``(loss, dlogits)``
    loss_and_dlogits = staticmethod(softmax_cross_entropy)

    def backward(self, cache: dict, dlogits: np.ndarray) -> tuple[list, list, list]:
        """Gradients ``(dW, db, dx)``: per layer, of the weights, the biases (of gamma and beta in BN layers:
        ``db[k] = (dgamma, dbeta)``) and the sigmoid inputs x_k (the logits for the last layer)."""
        from bnlib.numpy_bn import batch_norm_backward

        L = len(self.W)
        dW, db, dx = [None] * L, [None] * L, [None] * L
        g = dlogits
        for k in reversed(range(L)):
            dx[k] = g
            if k < L - 1 and self.bn:
                if cache["noise"] is not None:
                    g = g * cache["noise"][k][0]
                g, dgamma, dbeta = batch_norm_backward(g, cache["bn"][k])
                db[k] = (dgamma, dbeta)
            else:
                db[k] = g.sum(axis=0)
            dW[k] = (cache["u"][k].T @ g).T  # (out, in)
            if k > 0:
                u = cache["u"][k]
                g = (g @ self.W[k]) * u * (1.0 - u)
        return dW, db, dx

    def sgd_step(self, dW: list[np.ndarray], db: list, lr: float) -> None:
        for k, (W, gW, gb) in enumerate(zip(self.W, dW, db)):
            W -= lr * gW
            if isinstance(gb, tuple):
                self.gamma[k] -= lr * gb[0]
                self.beta[k] -= lr * gb[1]
            else:
                self.b[k] -= lr * gb

    def accuracy(self, u0: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of correct predictions (a BN network normalises with the statistics of ``u0`` itself)."""
        logits, _ = self.forward(u0)
        return float((logits.argmax(axis=1) == labels).mean())


class BNNoise:
    """The noise of "noisy BatchNorm": random scale and shift after each BN layer, redrawn at every step.

    In the spirit of Santurkar et al. (2018): i.i.d. noise with a non-zero mean and a non-unit variance whose
    distribution changes at every training step. :meth:`new_step` draws, for each hidden layer, a mean scale
    1 + a*U(0, 1), a mean shift a*U(-1, 1) and a spread a*U(0, 1) (a = ``amplitude``); :meth:`sample` then gives
    every activation of every example a scale ~ N(mean scale, spread^2) and a shift ~ N(mean shift, spread^2),
    as the list of ``(scale, shift)`` pairs that :meth:`SigmoidMLP.forward` takes.

    Defined in: chapters/01_why_normalize.ipynb
    """

    def __init__(self, widths: list[int], amplitude: float = 1.0, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        self.widths, self.amplitude, self.dtype = list(widths), amplitude, dtype
        self.rng = np.random.default_rng(0) if rng is None else rng
        self.new_step()

    def new_step(self) -> None:
        a, r = self.amplitude, self.rng
        self.params = [(1.0 + a * r.uniform(), a * r.uniform(-1.0, 1.0), a * r.uniform()) for _ in self.widths]

    def sample(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for w, (mean_scale, mean_shift, spread) in zip(self.widths, self.params):
            scale = mean_scale + spread * self.rng.standard_normal((n, w))
            shift = mean_shift + spread * self.rng.standard_normal((n, w))
            out.append((scale.astype(self.dtype), shift.astype(self.dtype)))
        return out


@dataclass
class DriftRecord:
    """What :func:`train_with_recording` saw at each recorded step (lists indexed like ``steps``).

    ``percentiles[t]``: the (15, 50, 85)th percentiles of the probe unit's sigmoid input over the probe set;
    ``input_mean[t][k]`` / ``input_std[t][k]``: per-unit mean / std over the probe set of layer k's input
    u_k (arrays of shape (sizes[k],)); ``saturation[t][k]``: fraction of hidden layer k's sigmoid inputs with
    |x| above the threshold; ``grad_rms[t][k]``: root-mean-square of dLoss/dx_k on the last training batch;
    ``accuracy[t]``: accuracy on the probe set.

    Defined in: chapters/01_why_normalize.ipynb
    """

    steps: list[int] = field(default_factory=list)
    percentiles: list[np.ndarray] = field(default_factory=list)
    input_mean: list[list[np.ndarray]] = field(default_factory=list)
    input_std: list[list[np.ndarray]] = field(default_factory=list)
    saturation: list[np.ndarray] = field(default_factory=list)
    grad_rms: list[np.ndarray] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def train_with_recording(
    net: SigmoidMLP,
    X: np.ndarray,
    y: np.ndarray,
    X_probe: np.ndarray,
    y_probe: np.ndarray,
    steps: int,
    batch_size: int = 60,
    lr: float = 0.5,
    record_every: int = 100,
    probe_layer: int = -1,
    probe_unit: int = 0,
    saturation_c: float = 0.1,
    rng: np.random.Generator | None = None,
    noise: BNNoise | None = None,
) -> DriftRecord:
    """Train ``net`` with plain minibatch SGD, recording the hidden distributions every ``record_every`` steps.

    Minibatches are drawn by reshuffling ``X`` each epoch. The probe unit is unit ``probe_unit`` of hidden
    layer ``probe_layer`` (``-1``: the last hidden layer), whose sigmoid-input percentiles are the paper's
    Figure 1b. Step 0 (before any update) is always recorded. A BN network normalises the probe set with its
    own batch statistics. With ``noise`` (a :class:`BNNoise`, BN networks only), every training step draws a
    new noise distribution; the recorded sigmoid inputs and saturation include that step's noise (what the
    layers see during training), the recorded accuracy does not.

    Defined in: chapters/01_why_normalize.ipynb
    """
    rng = np.random.default_rng(0) if rng is None else rng
    n_hidden = len(net.W) - 1
    layer = probe_layer % n_hidden
    thr = sigmoid_saturation_threshold(saturation_c)
    rec = DriftRecord()
    order = rng.permutation(len(X))
    pos = 0
    last_dx = None

    def record(step: int) -> None:
        logits, cache = net.forward(X_probe)
        if noise is not None:
            _, cache = net.forward(X_probe, noise=noise.sample(len(X_probe)))
        xs = cache["x"][:n_hidden]
        rec.steps.append(step)
        rec.percentiles.append(np.percentile(xs[layer][:, probe_unit], [15, 50, 85]))
        rec.input_mean.append([u.mean(axis=0) for u in cache["u"]])
        rec.input_std.append([u.std(axis=0) for u in cache["u"]])
        rec.saturation.append(np.array([float((np.abs(x) > thr).mean()) for x in xs]))
        rec.accuracy.append(float((logits.argmax(axis=1) == y_probe).mean()))
        if last_dx is not None:
            rec.grad_rms.append(np.array([float(np.sqrt(np.mean(np.square(g, dtype=np.float64)))) for g in last_dx]))

    for step in range(steps + 1):
        if pos + batch_size > len(X):
            order, pos = rng.permutation(len(X)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        if noise is not None:
            noise.new_step()
        logits, cache = net.forward(X[idx], noise=None if noise is None else noise.sample(len(idx)))
        _, dlogits = net.loss_and_dlogits(logits, y[idx])
        dW, db, last_dx = net.backward(cache, dlogits)
        if step % record_every == 0:
            record(step)  # the state before this step's update, with this batch's gradients
        if step < steps:
            net.sgd_step(dW, db, lr)
    return rec
