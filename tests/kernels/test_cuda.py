"""Every registered backend on real CUDA tensors, against a float64 reference built from the
same low-precision inputs on the same GPU.

The interpreter forgives out-of-bounds reads, strides and layouts, rounds bf16 differently
and never runs the shipped GPU block configurations; these tests do. Tolerances are the ones
stated once in ``tests/helpers.py`` (outputs at fp32 scale, gradients normwise), the same
``tests/kernels/test_breaks.py`` shows to catch a missing vocabulary split, a dropped softmax
term and a transposed weight read as contiguous. Skipped (with the reason) unless a CUDA GPU
is present and the interpreter is off: ``TRITON_INTERPRET=0 pytest tests/kernels/test_cuda.py``.
"""
import os

import pytest
import torch

from fused_losses import linear_cross_entropy, linear_logprobs
from fused_losses.reference import linear_cross_entropy_reference
from tests.backends import test_contract as contract
from tests.helpers import (BACKEND_PARAMS, HAS_TRITON, assert_grad_close, assert_values_close,
                           check_against_reference, make_inputs)

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()
         and os.environ.get("TRITON_INTERPRET") == "0"),
    reason="needs a CUDA GPU and TRITON_INTERPRET=0")

CUDA = "cuda"
# (N, H, V): sizes that fit no block, a single token, and LM heads (Llama-3, Gemma-2)
SHAPES = [(7, 37, 1001), (1, 64, 4097), (300, 512, 32000), (2048, 4096, 128256),
          (1024, 2304, 256000)]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_values_and_gradients_on_cuda(backend, shape, dtype):
    n, h, v = shape
    small = n * v <= 300 * 32000
    hidden, weight, targets, bias = make_inputs(n, h, v, dtype, bias=small, device=CUDA)
    options = dict(temperature=0.7, softcap=30.0) if small else {}
    check_against_reference(backend, dtype, hidden, weight, targets, bias, **options)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layouts", contract.LAYOUTS, ids="-".join)
def test_layouts_on_cuda(backend, layouts):
    contract.check_layouts(backend, *layouts, device=CUDA, shape=(300, 512, 32000),
                           dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("check", [contract.check_strided_upstream,
                                   contract.check_fp16_tiny_token_gradients,
                                   contract.check_filter_eps, contract.check_nan_contract],
                         ids=lambda f: f.__name__)
def test_contract_on_cuda(backend, check):
    check(backend, device=CUDA)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_mean_cross_entropy_over_8192_tokens_on_cuda(backend, dtype):
    contract.check_mean_over_8192_tokens(backend, dtype, device=CUDA, shape=(8192, 512, 32000))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_tokens_ignored_on_cuda(backend):
    hidden, weight, targets, _ = make_inputs(64, 256, 5000, torch.bfloat16, device=CUDA)
    targets.fill_(-100)
    out = linear_logprobs(hidden, weight, targets, backend=backend)
    grads = torch.autograd.grad(out.logprobs.sum(), (hidden, weight))
    assert not out.logprobs.any() and not any(g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_cross_entropy_on_cuda_matches_reference(backend, grad_in_forward):
    hidden, weight, targets, _ = make_inputs(1000, 1024, 50257, torch.bfloat16, device=CUDA)
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend,
                                grad_in_forward=grad_in_forward)
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    want = linear_cross_entropy_reference(*leaves, targets)
    assert_values_close(loss, want, torch.bfloat16, name="loss")
    grads = torch.autograd.grad(loss, (hidden, weight))
    for name, got, ref in zip(("hidden", "weight"), grads, torch.autograd.grad(want, leaves)):
        assert_grad_close(got, ref, torch.bfloat16, backend=backend, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bitwise_deterministic_and_zero_filter_is_exact_on_cuda(backend):
    hidden, weight, targets, _ = make_inputs(777, 1024, 32000, torch.bfloat16, device=CUDA)
    g = torch.randn(targets.shape, device=CUDA)

    def grads(**kw):
        out = linear_logprobs(hidden, weight, targets, backend=backend, **kw)
        return torch.autograd.grad((out.logprobs * g).sum(), (hidden, weight))

    first, again, zero_eps = grads(), grads(deterministic=True), grads(filter_eps=0.0)
    for a, b, c in zip(first, again, zero_eps):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("rows", [1024, 8192])  # the one-pass tiles ([1, 4096]), the widest rows
def test_in_place_16bit_gradient_equals_the_out_of_place_one_on_cuda(rows):
    """epilogue.grad writes a bf16 gradient over the first half of each fp32 product row,
    bytes that other warps of the program read: a race if the barrier between a tile's loads
    and its store were missing. Out of place (a separate buffer) there is nothing to race."""
    from fused_losses.kernels import epilogue

    vocab = 128256
    product = torch.randn(rows, vocab, device=CUDA) * 4
    targets = torch.randint(0, vocab, (rows,), device=CUDA)
    lse = torch.logsumexp(product, dim=-1)
    g = torch.randn(rows, device=CUDA)
    want = torch.empty(rows, vocab, dtype=torch.bfloat16, device=CUDA)
    epilogue.grad(product, want, 0, None, targets, lse, g, None, None, None, None, vocab=vocab)
    for _ in range(5):
        work = product.clone()
        view = work.view(torch.bfloat16)[:, :vocab]
        epilogue.grad(work, view, 0, None, targets, lse, g, None, None, None, None,
                      vocab=vocab)
        assert torch.equal(view, want)
