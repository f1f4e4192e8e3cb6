"""The cuBLAS + epilogue backend: torch matmuls and the epilogue kernels under the interpreter,
against the float64 chunked-torch backend on the same inputs (itself checked against the
materialised reference in tests/test_primitive.py)."""
import pytest
import torch

from fused_losses.backends import torch_chunked
from tests.helpers import (HAS_TRITON, assert_grad_close, assert_values_close,
                           check_against_reference, make_inputs)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

FLAGS = dict(with_argmax=True, with_entropy=True, with_logits_mean=True)
NAMES = ("logprobs", "lse", "argmax", "entropy", "logits_mean")


@pytest.fixture(scope="module")
def cublas():
    from fused_losses.backends import cublas_epilogue
    return cublas_epilogue


def _scored(targets):
    rows = (targets != -100).nonzero().squeeze(-1)
    return rows, targets[rows]


def _detached(*tensors):
    return [None if t is None else t.detach() for t in tensors]


def _double(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


def _check_stats(got, want, dtype):
    for name, a, b in zip(NAMES, got, want):
        if name == "argmax":
            assert torch.equal(a, b), name
        else:
            assert a.dtype == torch.float32, name
            assert_values_close(a, b, dtype, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_bytes", [None, 1 << 20], ids=["many-chunks", "one-chunk"])
def test_forward_and_backward_match_float64(cublas, dtype, chunk_bytes):
    hidden, weight, targets, bias = _detached(*make_inputs(13, 37, 101, dtype, bias=True))
    rows, tgt = _scored(targets)
    options = dict(temperature=0.7, softcap=2.5)
    got = cublas.forward(hidden, weight, bias, rows, tgt, chunk_bytes=chunk_bytes, **options,
                         **FLAGS)
    want = torch_chunked.forward(*_double(hidden, weight, bias), rows, tgt, **options, **FLAGS)
    _check_stats(got, want, dtype)
    upstream = [torch.randn(rows.numel(), dtype=torch.float64) for _ in range(4)]
    grads = cublas.backward(hidden, weight, bias, rows, tgt, got[1], got[3],
                            *(g.float() for g in upstream), chunk_bytes=chunk_bytes, **options)
    ref = torch_chunked.backward(*_double(hidden, weight, bias), rows, tgt, want[1], want[3],
                                  *upstream, **options)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, ref):
        assert a.dtype == dtype
        assert_grad_close(a, b, dtype, name=f"grad {name}")


def test_every_row_scored_transposed_weight_and_partial_needs(cublas):
    """No ignored row (hidden is used without a gather), a weight stored [H, V] and passed
    transposed, only dW asked for."""
    hidden, weight, targets, _ = _detached(*make_inputs(9, 24, 70, torch.float32,
                                                        ignore_frac=0.0))
    weight_t = weight.T.contiguous().T                       # strides (1, V)
    rows, tgt = _scored(targets)
    assert rows.numel() == 9
    stats = cublas.forward(hidden, weight_t, None, rows, tgt)
    g = torch.randn(9)
    got = cublas.backward(hidden, weight_t, None, rows, tgt, stats[1], None, g, None, None,
                          None, need_hidden=False, need_bias=False)
    ref = torch_chunked.backward(*_double(hidden, weight), None, rows, tgt, stats[1].double(),
                                  None, g.double(), None, None, None)
    assert got[0] is None and got[2] is None
    assert_grad_close(got[1], ref[1], torch.float32, name="grad weight")


def test_single_token_vocabulary_of_one_and_no_rows(cublas):
    hidden, weight, targets, bias = _detached(*make_inputs(1, 16, 1, torch.float32, bias=True,
                                                           ignore_frac=0.0))
    rows, tgt = _scored(targets)
    got = cublas.forward(hidden, weight, bias, rows, tgt, **FLAGS)
    want = torch_chunked.forward(*_double(hidden, weight, bias), rows, tgt, **FLAGS)
    _check_stats(got, want, torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    out = cublas.forward(hidden, weight, bias, empty, empty, **FLAGS)
    assert all(t.numel() == 0 for t in out)
    grads = cublas.backward(hidden, weight, bias, empty, empty, out[1], out[3], out[1], None,
                            None, None)
    assert all(g is not None and not g.any() for g in grads)


def test_in_place_gradient_equals_a_separate_buffer_and_splits_fold_alike():
    """The in-place 16-bit gradient over fp32 products equals one written elsewhere; one
    chunk folded in 3 column splits and two chunks folded in one give the same statistics."""
    from fused_losses.kernels import epilogue
    rows, cols = 11, 90
    product = torch.randn(rows, cols) * 3
    targets = torch.randint(0, cols, (rows,))
    lse = product.logsumexp(-1)
    g = torch.randn(rows)
    separate = torch.empty(rows, cols, dtype=torch.bfloat16)
    epilogue.grad(product, separate, 0, None, targets, lse, g, None, None, None, None,
                  vocab=cols)
    in_place = product.view(torch.bfloat16)[:, :cols]
    epilogue.grad(product, in_place, 0, None, targets, lse, g, None, None, None, None,
                  vocab=cols)
    assert torch.equal(in_place, separate)

    product = torch.randn(rows, cols) * 3
    flags = dict(with_argmax=True, with_entropy=True, with_logits_mean=True)
    split = epilogue.fold_state(3, rows, product.device, **flags)
    epilogue.fold(product, 0, None, targets, split, vocab=cols)
    chunked = epilogue.fold_state(1, rows, product.device, **flags)
    epilogue.fold(product[:, :50], 0, None, targets, chunked, vocab=cols)
    epilogue.fold(product[:, 50:].contiguous(), 50, None, targets, chunked, vocab=cols)
    stats = [epilogue.statistics(state, cols) for state in (split, chunked)]
    for name, a, b in zip(NAMES, *stats):
        torch.testing.assert_close(a, b, msg=name)
    assert torch.equal(stats[0][2], product.argmax(-1))
    torch.testing.assert_close(stats[0][1], product.logsumexp(-1))


# --- the same assertions catch a broken cuBLAS path (bf16, as the CUDA tests run it) ---------

def _check_bf16(**kwargs):
    torch.manual_seed(0)
    hidden, weight, targets, bias = make_inputs(16, 24, 100, torch.bfloat16, bias=True)
    check_against_reference("cublas", torch.bfloat16, hidden, weight, targets, bias, **kwargs)


def test_a_vocabulary_chunk_missing_from_the_fold_is_caught(monkeypatch):
    from fused_losses.kernels import epilogue
    _check_bf16(with_grads=())  # unbroken, it passes
    fold = epilogue.fold

    def skips_the_second_chunk(product, v0, *args, **kwargs):
        if v0 == 0:
            fold(product, v0, *args, **kwargs)

    monkeypatch.setattr(epilogue, "fold", skips_the_second_chunk)
    with pytest.raises(AssertionError, match="logprobs|lse"):
        _check_bf16(with_grads=())


def test_products_rounded_to_bf16_before_the_epilogue_are_caught(monkeypatch):
    """What torch < 2.8 without out_dtype would do: the logits lose fp32 and the statistics,
    held to fp32 scale, show it."""
    from fused_losses.backends import cublas_epilogue
    monkeypatch.setattr(cublas_epilogue, "product_dtype", lambda hidden: hidden.dtype)
    with pytest.raises(AssertionError, match="logprobs|lse|entropy|logits_mean"):
        _check_bf16(with_grads=())
