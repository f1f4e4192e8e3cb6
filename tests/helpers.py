"""Shared tolerances and comparison helpers. Every test compares against a float64
reference computed on materialised logits; tolerances are stated here once, per dtype."""
from __future__ import annotations

import importlib.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


# ---------------------------------------------------------------------------------------------
# Accuracy against a float64 reference built from the SAME (rounded) inputs: the reference
# upcasts the bf16/fp16 tensors the backend saw, so only the backend's own arithmetic counts.
# Stated once here; used by the CPU tests, the CUDA tests and the tests that break a kernel
# on purpose (tests/kernels/test_breaks.py), so a tolerance that lets a break through fails
# there.
# ---------------------------------------------------------------------------------------------

# lse, logprobs, entropy, logits_mean: every backend forms logits and statistics in fp32
# whatever the input dtype, so these are held to fp32 scale for every input dtype: (rtol, atol).
# A vocabulary split missing from the lse is off by ~0.2; a logit rounded to bf16, by ~1e-2.
VALUE_TOL = {torch.float64: (1e-10, 1e-10), "fp32": (1e-4, 1e-4)}

# Gradients, normwise: ||got - want|| / ||want|| per output dtype. 16-bit gradients are
# rounded twice (the logit-gradient chunk, then dH/dW themselves), each at most the unit
# roundoff u (bf16 2**-8, fp16 2**-11) per entry and about u / sqrt(3) in RMS: the bound is
# 1.5 u (measured on the torch backend, whose arithmetic the kernels share: 0.6 u at N = 512,
# H = 1024, V = 32000; at most 1.0 u over 200 tiny random cases). fp32: the GEMMs' own
# rounding over K up to V. A softmax term dropped from dH/dW moves them by 0.9-3% at LM-head
# sizes, a missing vocabulary split moves lse by ~0.2: tests/kernels/test_breaks.py.
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1.5 * 2.0 ** -8,
            torch.float16: 1.5 * 2.0 ** -11}
# The Triton interpreter converts fp32 to bf16 by truncation (round toward zero: up to 2u,
# biased), where a GPU rounds to nearest even; its bf16 gradients get twice the tolerance.
INTERPRETER_BF16_FACTOR = 2.0


def grad_tol(dtype: torch.dtype, backend: str | None = None) -> float:
    """The normwise gradient tolerance for ``dtype`` on ``backend`` (None: not Triton)."""
    tol = GRAD_TOL[dtype]
    if dtype == torch.bfloat16 and backend is not None and _interpreted(backend):
        tol *= INTERPRETER_BF16_FACTOR
    return tol


def _interpreted(backend: str) -> bool:
    import os

    from fused_losses.backends import _REGISTRY
    return os.environ.get("TRITON_INTERPRET") == "1" and _REGISTRY[backend].triton


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype,
                        *, name: str = "") -> None:
    """Per-token statistics at fp32 scale (float64 inputs: at float64 scale); NaN where the
    reference has NaN and nowhere else."""
    rtol, atol = VALUE_TOL.get(input_dtype, VALUE_TOL["fp32"])
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    diff = torch.linalg.vector_norm(actual.double() - expected)
    return float(diff / torch.linalg.vector_norm(expected).clamp(min=1e-300))


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                      backend: str | None = None, name: str = "") -> None:
    """A gradient against its float64 reference, normwise, at ``dtype``'s tolerance."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{name}: non-finite entries"
    error, tol = normwise_error(actual, expected), grad_tol(dtype, backend)
    if actual.dtype == torch.float16:
        # Below fp16's smallest normal (2^-14) its spacing is a constant 2^-24: an entry stored
        # there is off by up to half of it whatever the arithmetic before (a mean over 8192
        # tokens makes dW entries ~5e-7 at V = 32000), so those entries add their own bound.
        subnormal = int((expected.abs() < 2.0 ** -14).sum())
        norm = float(torch.linalg.vector_norm(expected.double()).clamp(min=1e-300))
        tol += 2.0 ** -25 * subnormal ** 0.5 / norm
    assert error <= tol, f"{name}: normwise relative error {error:.3g} > {tol:.3g} ({dtype})"


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


OUTPUTS = ("logprobs", "lse", "entropy", "logits_mean")
_FUSED_ONLY = ("chunk_size", "filter_eps", "deterministic")


def _weighted_sum(out, upstream):
    """sum_k <output_k, g_k> over the outputs with an upstream gradient."""
    return sum((getattr(out, name).double() * g).sum() for name, g in upstream.items())


def check_against_reference(backend, dtype, hidden, weight, targets, bias, *,
                            with_grads=OUTPUTS, **kwargs):
    """linear_logprobs on ``backend`` against the float64 reference on materialised logits
    built from the same inputs: every output at fp32 scale, the argmax a maximum, and the
    gradient of every input (normwise) under random upstream gradients on ``with_grads``."""
    from fused_losses import linear_logprobs
    from fused_losses.reference import linear_logprobs_reference, reference_logits

    kwargs = dict(dict(return_lse=True, return_argmax=True, return_entropy=True,
                       return_logits_mean=True), **kwargs)
    out = linear_logprobs(hidden, weight, targets, bias, backend=backend, **kwargs)
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    ref = linear_logprobs_reference(leaves[0], leaves[1], targets, leaves[2],
                                    **{k: v for k, v in kwargs.items() if k not in _FUSED_ONLY})
    for name in OUTPUTS:
        if getattr(ref, name) is not None:
            got = getattr(out, name)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == targets.shape
            assert_values_close(got, getattr(ref, name), dtype, name=name)
    if out.argmax is not None:
        # Near-ties may resolve differently at low precision: the chosen token must be a max.
        logits = reference_logits(*(None if t is None else t.detach() for t in leaves),
                                  temperature=kwargs.get("temperature", 1.0),
                                  softcap=kwargs.get("softcap"))
        valid = targets != -100
        assert (out.argmax[~valid] == -100).all()
        picked = logits.gather(-1, out.argmax.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        assert_values_close(picked[valid], logits.max(-1).values[valid], dtype,
                            name="argmax logit")
    upstream = {name: torch.randn(targets.shape, dtype=torch.float64, device=targets.device)
                for name in with_grads}
    if not upstream:
        return
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(_weighted_sum(out, upstream), params)
    ref_grads = torch.autograd.grad(_weighted_sum(ref, upstream),
                                    [t for t in leaves if t is not None])
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype
        assert_grad_close(got, want, dtype, backend=backend, name=f"grad {name}")


class LargestTensors(TorchDispatchMode):
    """Inside ``with LargestTensors(vocab) as seen:``, records what every ATen op returns
    (views included, autograd's backward too): ``seen.rows``, the most rows of any
    ``[..., vocab]`` tensor (logits or their gradient), and ``seen.elements``, the most
    elements of any tensor. A fused loss must keep both at its chunk, not its batch.

    The Triton interpreter copies each kernel argument's storage through ``uint8`` byte
    tensors (itemsize times its elements); those are skipped: the arguments themselves are
    made by ops recorded here."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.rows = self.elements = 0

    def __enter__(self) -> "LargestTensors":
        self.rows = self.elements = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.elements = max(self.elements, t.numel())
                if t.dim() and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out
