"""Shared steps: shifting, layouts, discounted sums, log1mexp."""
import math

import pytest
import torch

from fused_losses.objectives._common import (discounted_suffix_sum, log1mexp, shift_targets,
                                             to_labels_layout, to_prediction_layout)

F64 = torch.float64


def test_shift_and_layouts_round_trip():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert shift_targets(labels).tolist() == [[5, 6, -100, -100], [-100, 7, 8, -100]]
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert to_prediction_layout(x).tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert to_labels_layout(to_prediction_layout(x)).tolist() == [[0.0, 1.0, 2.0, 3.0]]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("length,block", [(1, 128), (9, 4), (300, 128), (17, 17)])
def test_discounted_suffix_sum(gamma, length, block):
    x = torch.randn(3, length, dtype=F64, requires_grad=True)
    want = torch.zeros_like(x)
    acc = torch.zeros(3, dtype=F64)
    for t in reversed(range(length)):
        acc = x[:, t] + gamma * acc
        want[:, t] = acc
    got = discounted_suffix_sum(x, gamma, block=block)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                               torch.autograd.grad(want, x, g)[0], rtol=1e-12, atol=1e-12)


def test_log1mexp_both_ends():
    x = torch.tensor([1e-12, 1e-6, 0.1, math.log(2), 1.0, 30.0, 800.0], dtype=F64)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(-mpmath.mpf(v)))) for v in x.tolist()],
                        dtype=F64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-14, atol=0)
