"""fused_losses.reference.distill_loss_reference (the unfused baseline of benchmarks and the
trainer) against the tests' own naive objective, float64, values and student gradients."""
import pytest
import torch

from fused_losses.reference import distill_loss_reference
from tests.divergence import naive
from tests.helpers import assert_close


@pytest.mark.parametrize("kind,beta,temperature,hard_weight", [
    ("jsd", 0.3, 1.5, 0.4), ("forward_kl", 0.5, 1.0, 0.0), ("reverse_kl", 0.5, 0.8, 1.0),
    ("jsd", 1.0, 1.0, 0.0)])
def test_reference_matches_naive(kind, beta, temperature, hard_weight):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = (torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
                          torch.randn(23, 6, generator=g, dtype=torch.float64))
    labels = torch.randint(0, 23, (2, 5), generator=g)
    labels[0, :2] = -100
    options = dict(beta=beta, temperature=temperature, hard_weight=hard_weight)
    got = distill_loss_reference(hidden, weight, t_hidden, t_weight, labels, divergence=kind,
                                 num_items_in_batch=7, **options)
    want = naive.distill(hidden, weight, t_hidden, t_weight, labels, kind=kind, divisor=7,
                         **options)
    assert_close(got.detach(), want.detach(), torch.float64, name="loss")
    for name, a, b in zip(("dH", "dW"), torch.autograd.grad(got, (hidden, weight)),
                          torch.autograd.grad(want, (hidden, weight))):
        assert_close(a, b, torch.float64, name=name)
