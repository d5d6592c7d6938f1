"""bnlib: Batch Normalization from scratch, the library the book's chapters build.

Modules (the chapter that defines each; CONTRIBUTING.md maps chapter <-> module <-> test)
-------
motivation  ch01  least-squares conditioning, the recording sigmoid network (Figure 1 in NumPy), noisy BN.
data        ch01  MNIST: provisioning (offline-friendly) and the one reader of the raw files (NumPy and torch views).
utils       ch01  seeds and thread settings shared by the chapters.
layers      ch01/04  NumPy layers: sigmoid, ReLU, Linear, BatchNorm, softmax cross-entropy, the MLP and its training.
numpy_bn    ch02-04  NumPy batch-norm forward/backward and a BatchNorm layer with PyTorch's semantics.
gradcheck   ch03  central-difference numerical gradients and relative errors.
inference   ch04  population statistics for inference (the paper's Algorithm 2, or exact).
torch_bn    ch06  a torch.autograd version: drop-in replacements for torch.nn.BatchNorm1d/2d/3d.
models      ch06/07  torch networks: the seed CNN, the Figure 1 MLP (one seed, or many seeds batched).
mnist       ch07  the MNIST experiments: minibatch indices, Figure 1, the CNN runs.
norms       ch08  layer, instance and group norm (NumPy and torch), batch renorm, ghost BN, the small-batch runs.
diagnostics ch10  layer health (activations, gradients, update ratios), ICS as gradient change, loss-landscape smoothness.
why         ch10  deep batched MLPs (plain/residual, BN/noisy BN/lp) and the why-BN-works experiments (python -m bnlib why).
sync_bn     ch09  SyncBatchNorm on torch.distributed (CPU/gloo too); ddp: process groups on one machine, DDP runs.
results     ch07  committed results of long runs (results/*.json) with their provenance.
exercises   ch01-07  one checker module per chapter on one harness (exercises/harness.py).
__main__    ch07  command line: python -m bnlib data | figure1 | cnn.
"""

__version__ = "0.1.0"
