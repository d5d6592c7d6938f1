"""Data loading for MNIST: whole-tensor index batching versus the standard Dataset + DataLoader pipeline.

Both pipelines deliver the same thing, standardised float32 minibatches ``(B, 1, 28, 28)`` with their labels:

* ``dataloader``: ``torchvision.datasets.MNIST(transform=Compose([ToTensor(), Normalize(mean, std)]))`` in a
  ``DataLoader(shuffle=True, num_workers=0)``: one PIL image and two transforms per sample, then collation;
* ``index batching``: the split standardised once as one tensor (:func:`bnlib.data.standardize`), then one
  gather ``x[idx]`` per minibatch with indices from :func:`bnlib.mnist.batch_indices`.

Run: ``python bench/bench_data.py [--quick]``. ``main(quick)`` returns the rows and prints a Markdown table.
Threads are pinned to 1 (the book's setting for small tensors).

Defined in: chapters/07_mnist.ipynb
"""

from __future__ import annotations

import sys
import time

import torch


def _time_batches(batches, n_batches: int) -> tuple[float, int]:
    """Seconds to draw ``n_batches`` minibatches (touching each tensor), and the number of samples."""
    t0 = time.perf_counter()
    samples = 0
    for i, (xb, yb) in enumerate(batches):
        samples += xb.shape[0]
        float(xb[0, 0, 0, 0]) + int(yb[0])  # make sure the batch is materialised
        if i + 1 == n_batches:
            break
    return time.perf_counter() - t0, samples


def main(quick: bool = False) -> list[dict]:
    """Samples/s of both pipelines for batch sizes 60 and 256; prints a Markdown table, returns its rows."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from bnlib.data import MNIST_MEAN, MNIST_STD, default_root, load_mnist, provision_mnist, standardize
    from bnlib.mnist import batch_indices

    torch.set_num_threads(1)
    root = str(provision_mnist(default_root(), verbose=False))
    n_samples = 3_000 if quick else 30_000
    rows = []
    for batch_size in (60, 256):
        n_batches = max(1, n_samples // batch_size)

        tfm = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
        ds = datasets.MNIST(root, train=True, download=False, transform=tfm)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(0))
        t_dl, s_dl = _time_batches(loader, n_batches)

        t0 = time.perf_counter()
        images, labels = load_mnist(True, root)
        x = standardize(images)
        t_setup = time.perf_counter() - t0
        batches = ((x[idx], labels[idx]) for idx in batch_indices(x.shape[0], batch_size, 0))
        t_ix, s_ix = _time_batches(batches, n_batches)

        # the two pipelines agree on the values: one sample through both
        ref, label = ds[7]
        assert label == int(labels[7]) and torch.allclose(ref, x[7], atol=1e-6)

        rows.append({
            "batch size": batch_size,
            "samples": s_dl,
            "DataLoader samples/s": s_dl / t_dl,
            "index batching samples/s": s_ix / t_ix,
            "speed-up": (s_ix / t_ix) / (s_dl / t_dl),
            "one-off tensor setup (s)": t_setup,
        })
    print("| batch size | samples | DataLoader (samples/s) | index batching (samples/s) | speed-up | tensor setup (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch size']} | {r['samples']} | {r['DataLoader samples/s']:,.0f} | "
              f"{r['index batching samples/s']:,.0f} | {r['speed-up']:.0f}x | {r['one-off tensor setup (s)']:.2f} |")
    return rows


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
