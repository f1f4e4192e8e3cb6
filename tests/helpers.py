"""Shared tolerances and comparison helpers. Every test compares against a float64
reference computed on materialised logits; tolerances are stated here once, per dtype."""
from __future__ import annotations

import importlib.util

import torch

# (rtol, atol) for fused results in a given input dtype against the float64 reference.
# bf16/fp16 logits are formed by a low-precision matmul, so their error is that of torch's
# own matmul at that dtype, plus a margin.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 8e-2),
}

HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend_params():
    """Every registered backend except "auto", as pytest params; the Triton-based ones are
    skipped (with the reason) where triton is not installed. Registering a backend adds it
    to every test parametrized with this."""
    import pytest

    from fused_losses.backends import _REGISTRY

    return [pytest.param(name, marks=pytest.mark.skipif(
        entry.triton and not HAS_TRITON, reason="triton is not installed"))
        for name, entry in _REGISTRY.items()]


BACKEND_PARAMS = backend_params()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 scale: float = 1.0, name: str = "") -> None:
    """``actual`` (any dtype) against a float64 ``expected`` at ``dtype``'s tolerance.

    ``scale`` widens the tolerance for quantities that sum many terms (e.g. dW).
    """
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale,
                               atol=atol * scale, msg=lambda m: f"{name}: {m}")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, *, bias: bool = False,
                ignore_frac: float = 0.25, ignore_index: int = -100, lead=None,
                device: str = "cpu"):
    """Random (hidden, weight, targets, bias) with about ``ignore_frac`` positions ignored.

    Hidden and weight are scaled so logits have unit-ish spread: a peaked but not one-hot
    distribution, where every gradient term matters.
    """
    lead = lead or (n,)
    hidden = torch.randn(*lead, h, dtype=torch.float64) / h ** 0.25
    weight = torch.randn(v, h, dtype=torch.float64) / h ** 0.25
    targets = torch.randint(0, v, lead)
    targets[torch.rand(lead) < ignore_frac] = ignore_index
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    cast = [t.to(device, dtype).requires_grad_() if t is not None else None
            for t in (hidden, weight, b)]
    return cast[0], cast[1], targets.to(device), cast[2]
