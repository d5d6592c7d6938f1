"""bnlib: Batch Normalization from scratch, the library the book's chapters build.

Modules
-------
numpy_bn   NumPy forward/backward and a BatchNorm layer with PyTorch's semantics.
gradcheck  Central-difference numerical gradients and relative errors.
torch_bn   A torch.autograd version: drop-in replacements for torch.nn.BatchNorm1d/2d/3d.
data       MNIST provisioning (offline-friendly) and whole-dataset tensors.
utils      Seeds and thread settings shared by the chapters.
"""

__version__ = "0.1.0"
