"""The torch networks of the book, with and without batch normalization.

* :class:`SeedCNN`: the "seed articles'" convnet conv32-conv64-maxpool-dropout-fc128-fc10, optionally with
  BN after each conv and after fc1, placed before (``"pre"``) or after (``"post"``) the ReLU.
* :class:`BatchedMLP`: the paper's Figure 1 network, 784-100-100-100-10 with sigmoids, for ``S`` independent
  seeds trained at once (weights of shape ``(S, in, out)``); with BN before each sigmoid.
* :func:`mlp`: the same MLP for one seed as a plain ``nn.Sequential`` (the reference the batched one equals).

The Figure 1 network is one family across the book: chapter 1 trains it in NumPy
(:class:`bnlib.motivation.SigmoidMLP`, the same sizes, weights ~ N(0, init_std²) in the (out, in) layout of
``nn.Linear``), chapter 7 in torch (:func:`mlp`, :class:`BatchedMLP`).

BN layers are bnlib's drop-ins by default (:mod:`bnlib.torch_bn`); pass ``bn_layer=torch.nn.BatchNorm1d`` (and
``bn2d_layer``) to use torch's.

Defined in: chapters/06_bn_pytorch.ipynb (SeedCNN, default_bn_layers); chapters/07_mnist.ipynb (mlp, BatchedMLP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["default_bn_layers", "SeedCNN", "LeNet", "mlp", "BatchedMLP"]


def default_bn_layers() -> tuple[type, type]:
    """(BatchNorm1d, BatchNorm2d): bnlib's drop-ins (:mod:`bnlib.torch_bn`), the defaults of every model here.

    Defined in: chapters/06_bn_pytorch.ipynb
    """
    from bnlib.torch_bn import BatchNorm1d, BatchNorm2d

    return BatchNorm1d, BatchNorm2d


class SeedCNN(nn.Module):
    """conv(1→32, 3×3) → conv(32→64, 3×3) → maxpool 2 → dropout 0.25 → fc(9216→128) → dropout 0.5 → fc(128→10).

    Parameters
    ----------
    bn : insert BatchNorm2d after each conv and BatchNorm1d after fc1.
    bn_position : ``"pre"`` (conv → BN → ReLU, the paper's placement) or ``"post"`` (conv → ReLU → BN).
    dropout : keep the two dropout layers (the paper notes BN lets you reduce dropout).

    Input ``(N, 1, 28, 28)``, output logits ``(N, 10)``. Layers with BN have no bias (β replaces it).

    Defined in: chapters/06_bn_pytorch.ipynb; trained in chapters/07_mnist.ipynb
    """

    def __init__(self, bn: bool = False, bn_position: str = "pre", dropout: bool = True,
                 bn_layer: type | None = None, bn2d_layer: type | None = None):
        super().__init__()
        if bn_position not in ("pre", "post"):
            raise ValueError(f"bn_position must be 'pre' or 'post', got {bn_position!r}")
        d1, d2 = default_bn_layers()
        bn1d, bn2d = bn_layer or d1, bn2d_layer or d2
        bias = not (bn and bn_position == "pre")

        def block(layer, norm):
            if not bn:
                return [layer, nn.ReLU()]
            return [layer, norm, nn.ReLU()] if bn_position == "pre" else [layer, nn.ReLU(), norm]

        self.features = nn.Sequential(
            *block(nn.Conv2d(1, 32, 3, bias=bias), bn2d(32)),
            *block(nn.Conv2d(32, 64, 3, bias=bias), bn2d(64)),
            nn.MaxPool2d(2),
            nn.Dropout(0.25 if dropout else 0.0),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            *block(nn.Linear(9216, 128, bias=bias), bn1d(128)),
            nn.Dropout(0.5 if dropout else 0.0),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """The seeds' LeNet-style CNN: conv(1→6, 5×5, pad 2) → ReLU → maxpool 2 → [BN(6)] → conv(6→16, 5×5) → ReLU →
    maxpool 2 → [BN(16)] → fc(400→120) → ReLU → fc(120→84) → ReLU → fc(84→10).

    BN (if ``bn``) sits after each pooling, as in the W&B report this course started from; padding 2 on the first
    conv adapts LeNet-5's 32×32 input to MNIST's 28×28 (so the flattened size is 16·5·5 = 400, as in LeNet-5).
    Input ``(N, 1, 28, 28)``, output logits ``(N, 10)``.

    Defined in: chapters/07_mnist.ipynb
    """

    def __init__(self, bn: bool = False, bn2d_layer: type | None = None):
        super().__init__()
        bn2d = bn2d_layer or default_bn_layers()[1]

        def norm(c):
            return [bn2d(c)] if bn else []

        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), *norm(6),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), *norm(16),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(bn: bool = False, sizes: tuple[int, ...] = (784, 100, 100, 100, 10), init_std: float = 0.1,
        generator: torch.Generator | None = None, bn_layer: type | None = None) -> nn.Sequential:
    """One 784-100-100-100-10 sigmoid MLP (Figure 1 of the paper), BN before each sigmoid if ``bn``.

    Weights ~ N(0, init_std²) ("small random Gaussian values"), biases 0 (no bias before BN: β replaces it).

    Defined in: chapters/07_mnist.ipynb
    """
    bn1d = bn_layer or default_bn_layers()[0]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        lin = nn.Linear(n_in, n_out, bias=last or not bn)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=generator) * init_std)
            if lin.bias is not None:
                lin.bias.zero_()
        layers.append(lin)
        if not last:
            if bn:
                layers.append(bn1d(n_out))
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class BatchedMLP(nn.Module):
    """``S`` independent sigmoid MLPs evaluated as one batched computation.

    Weights ``W[l]`` have shape ``(S, in, out)``; seed ``s`` uses ``W[l][s]``. Input ``(S, N, 784)`` (each
    seed its own minibatch) or ``(N, 784)`` (the same examples for every seed, e.g. the test set); output
    ``(S, N, 10)``. BN runs on the ``(N, S·out)`` view of the pre-activations: one ``BatchNorm1d(S·out)``
    normalises each (seed, unit) column over the batch, exactly the per-seed, per-unit statistics of ``S``
    separate models. Summing the per-seed mean losses gives each seed exactly its own gradient.

    ``init_std``: weights ~ N(0, init_std²) with one generator per seed (seed ``seeds[s]``), the
    same draws as :func:`mlp` with ``torch.Generator().manual_seed(seeds[s])``; a sequence gives each network
    its own scale (a grid over init scales in one batched run).

    Defined in: chapters/07_mnist.ipynb
    """

    def __init__(self, seeds: list[int] | tuple[int, ...], bn: bool = False,
                 sizes: tuple[int, ...] = (784, 100, 100, 100, 10), init_std: float | list[float] = 0.1,
                 bn_layer: type | None = None):
        super().__init__()
        self.S, self.sizes, self.bn = len(seeds), tuple(sizes), bn
        bn1d = bn_layer or default_bn_layers()[0]
        stds = [float(init_std)] * self.S if isinstance(init_std, (int, float)) else [float(v) for v in init_std]
        if len(stds) != self.S:
            raise ValueError(f"init_std has {len(stds)} values for {self.S} seeds")
        per_seed = [mlp(bn, sizes, std, torch.Generator().manual_seed(int(s)), nn.BatchNorm1d)
                    for s, std in zip(seeds, stds)]
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in per_seed]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        self._bias_index: dict[int, int] = {}  # layer -> position in self.biases (no bias before BN)
        n_layers = len(sizes) - 1
        for i in range(n_layers):
            w = torch.stack([lin[i].weight.detach().T for lin in linears])  # (S, in, out)
            self.weights.append(nn.Parameter(w.contiguous()))
            last = i == n_layers - 1
            if last or not bn:
                self._bias_index[i] = len(self.biases)
                self.biases.append(nn.Parameter(torch.zeros(self.S, 1, sizes[i + 1])))
            if bn and not last:
                self.norms.append(bn1d(self.S * sizes[i + 1]))

    def _linear(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[i]
        b = self.biases[self._bias_index[i]] if i in self._bias_index else None
        if x.dim() == 2:  # shared input: one (N, in) @ (in, S·out) product
            S, n_in, n_out = w.shape
            h = (x @ w.permute(1, 0, 2).reshape(n_in, S * n_out)).reshape(x.shape[0], S, n_out).transpose(0, 1)
            return h if b is None else h + b
        return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)

    def _norm(self, i: int, h: torch.Tensor) -> torch.Tensor:
        S, N, n = h.shape
        z = self.norms[i](h.transpose(0, 1).reshape(N, S * n))  # (N, S·n): column s·n + j = seed s, unit j
        return z.reshape(N, S, n).transpose(0, 1)

    def forward(self, x: torch.Tensor, return_preacts: bool = False):
        """Logits ``(S, N, 10)``; with ``return_preacts`` also the list of sigmoid inputs ``(S, N, 100)``."""
        pre = []
        h = x
        for i in range(len(self.weights) - 1):
            h = self._linear(i, h)
            if self.bn:
                h = self._norm(i, h)
            pre.append(h)
            h = torch.sigmoid(h)
        out = self._linear(len(self.weights) - 1, h)
        return (out, pre) if return_preacts else out

    def seed_model(self, s: int, bn_layer: type | None = None) -> nn.Sequential:
        """Seed ``s`` as a plain :func:`mlp` with the same parameters and BN buffers (a copy)."""
        net = mlp(self.bn, self.sizes, bn_layer=bn_layer)
        lins = [m for m in net if isinstance(m, nn.Linear)]
        norms = [m for m in net if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bias_iter = iter(self.biases)
        with torch.no_grad():
            for i, lin in enumerate(lins):
                lin.weight.copy_(self.weights[i][s].T)
                if lin.bias is not None:
                    lin.bias.copy_(next(bias_iter)[s, 0])
            for norm, big in zip(norms, self.norms):
                n = norm.num_features
                sl = slice(s * n, (s + 1) * n)
                norm.weight.copy_(big.weight[sl])
                norm.bias.copy_(big.bias[sl])
                norm.running_mean.copy_(big.running_mean[sl])
                norm.running_var.copy_(big.running_var[sl])
                norm.num_batches_tracked.copy_(big.num_batches_tracked)
        net.train(self.training)
        return net
