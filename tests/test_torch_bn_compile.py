"""bnlib's BatchNorm under torch.compile: the seed CNN compiles as one graph (no graph breaks), and the
compiled forward and backward match eager to float32 accuracy.

The tolerance is derived, not guessed: eager float32 and compiled float32 are both compared with the same
model in float64, and the compiled error must be at most a small multiple of eager's own float32 error
(inductor fuses and reorders the sums, so its rounding differs from eager's but not its size).
"""

import copy

import pytest
import torch

from bnlib import torch_bn as tb
from bnlib.models import SeedCNN

K = 4.0  # compiled error <= K * eager error + FLOOR (relative to the largest value of each quantity)
FLOOR = 8 * torch.finfo(torch.float32).eps  # a few float32 roundings of the largest value


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _model_and_batch():
    torch.manual_seed(0)
    model = SeedCNN(bn=True, dropout=False)  # bnlib's BatchNorm1d/2d by default; no dropout: deterministic
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {
        tb.BatchNorm1d, tb.BatchNorm2d}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g)
    target = torch.randint(0, 10, (8,), generator=g)
    return model, x, target


def _step(model, x, target):
    """Training-mode forward and backward: logits, parameter gradients, updated running statistics."""
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [out.detach(), *grads, *[b.detach().clone() for b in model.buffers() if b.is_floating_point()]]


def test_seed_cnn_has_no_graph_breaks():
    model, x, _ = _model_and_batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_and_backward_match_eager_to_float32_accuracy():
    model, x, target = _model_and_batch()
    exact_model = copy.deepcopy(model).double()
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    exact = _step(exact_model, x.double(), target)
    eager = _step(eager_model, x, target)
    got = _step(compiled, x, target)
    assert len(exact) == len(eager) == len(got)
    for i, (e, a, c) in enumerate(zip(exact, eager, got)):
        scale = e.abs().max().item() or 1.0
        err_eager = (a.double() - e).abs().max().item() / scale
        err_compiled = (c.double() - e).abs().max().item() / scale
        assert c.dtype == torch.float32
        assert err_compiled <= K * err_eager + FLOOR, (i, err_compiled, err_eager)
