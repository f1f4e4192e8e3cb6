"""The Triton kernels on real CUDA tensors, against the float64 reference on the same GPU.

The interpreter forgives out-of-bounds reads, dtype slips and block shapes a GPU rejects, and
it never runs the shipped GPU block configurations; these tests do. Skipped (with the reason)
unless a CUDA GPU is present and the interpreter is off:
``TRITON_INTERPRET=0 pytest tests/kernels/test_cuda.py`` (``benchmarks/gpu_session.sh tests``).
"""
import os

import pytest
import torch

from fused_losses import linear_cross_entropy, linear_logprobs
from fused_losses.reference import linear_cross_entropy_reference
from tests.helpers import HAS_TRITON, assert_close, make_inputs
from tests.test_primitive import check_against_reference

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()
         and os.environ.get("TRITON_INTERPRET") == "0"),
    reason="needs a CUDA GPU and TRITON_INTERPRET=0")

# (N, H, V): sizes that fit no block, a single token, and LM heads (Llama-3, Gemma-2)
SHAPES = [(7, 37, 1001), (1, 64, 4097), (300, 512, 32000), (2048, 4096, 128256),
          (1024, 2304, 256000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=str)
def test_values_and_gradients_on_cuda(shape, dtype):
    n, h, v = shape
    small = n * v <= 300 * 32000
    hidden, weight, targets, bias = make_inputs(n, h, v, dtype, bias=small, device="cuda")
    options = dict(temperature=0.7, softcap=30.0) if small else {}
    check_against_reference("triton", dtype, hidden, weight, targets, bias, **options)


def test_all_tokens_ignored_on_cuda():
    hidden, weight, targets, _ = make_inputs(64, 256, 5000, torch.bfloat16, device="cuda")
    targets.fill_(-100)
    out = linear_logprobs(hidden, weight, targets, backend="triton")
    grads = torch.autograd.grad(out.logprobs.sum(), (hidden, weight))
    assert not out.logprobs.any() and not any(g.any() for g in grads)


def test_cross_entropy_on_cuda_matches_reference():
    hidden, weight, targets, _ = make_inputs(1000, 1024, 50257, torch.bfloat16, device="cuda")
    loss = linear_cross_entropy(hidden, weight, targets, backend="triton")
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    want = linear_cross_entropy_reference(*leaves, targets)
    assert_close(loss, want, torch.bfloat16, name="loss")
    grads = torch.autograd.grad(loss, (hidden, weight))
    for got, ref in zip(grads, torch.autograd.grad(want, leaves)):
        assert_close(got, ref, torch.bfloat16, scale=4.0)


def test_bitwise_deterministic_and_zero_filter_is_exact_on_cuda():
    hidden, weight, targets, _ = make_inputs(777, 1024, 32000, torch.bfloat16, device="cuda")
    g = torch.randn(targets.shape, device="cuda")

    def grads(**kw):
        out = linear_logprobs(hidden, weight, targets, backend="triton", **kw)
        return torch.autograd.grad((out.logprobs * g).sum(), (hidden, weight))

    first, again, zero_eps = grads(), grads(deterministic=True), grads(filter_eps=0.0)
    for a, b, c in zip(first, again, zero_eps):
        assert torch.equal(a, b) and torch.equal(a, c)
