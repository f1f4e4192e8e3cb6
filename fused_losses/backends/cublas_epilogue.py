"""cuBLAS GEMMs on chunks, each chunk folded by fused Triton epilogues: backend ``"cublas"``.

The GEMMs are ``torch.mm``/``torch.addmm`` (cuBLAS on CUDA) writing fp32 from 16-bit operands
(``out_dtype=torch.float32``, torch >= 2.8 on CUDA); the kernels of ``kernels/epilogue.py``
read each fp32 chunk of raw products once, applying bias, temperature and soft-cap on the fly.

* ``forward``: vocabulary chunks over every scored row, ``[N, C]`` fp32 products of about
  ``configs.CUBLAS_CHUNK_BYTES``; ``epilogue.fold`` merges each chunk into the per-token
  online statistics. 2NHV FLOPs; the products are written and read once.
* ``backward``: the same chunks recomputed; ``epilogue.grad`` turns each into the logit
  gradient in place (in the GEMM operand dtype, over the first half of each fp32 row), then
  ``dH += G @ W[chunk]`` into an fp32 ``[N, H]`` accumulator and ``dW[chunk] = Gᵀ @ hidden``
  (K = N: fp32 accumulation inside cuBLAS, each row of dW written once, so no fp32 ``[V, H]``
  buffer). 6NHV; 8NHV with the forward.
* ``forward_backward`` (the 6NHV path of losses whose upstream gradient is known in forward):
  token chunks of whole groups over all of V, ``[n, V]`` fp32 products of about
  ``configs.ONE_PASS_ROWS`` rows: statistics, the loss's upstream gradients, the gradient in
  place, ``dH[chunk] = G @ W`` (K = V, written once) and ``dW += Gᵀ @ hidden[chunk]`` into an
  fp32 ``[V, H]`` accumulator. Each logit is formed once: 6NHV in total.

On the CPU the GEMMs are torch's (16-bit operands upcast to fp32, so the products are the fp32
products of the same inputs) and the epilogues run under ``TRITON_INTERPRET=1``; that is how
the tests run it. Without ``out_dtype`` (torch < 2.8 on CUDA) the products are rounded to the
input dtype before the epilogue (error about ``|z| * 2**-8`` in bf16 logits).
The interface of :mod:`fused_losses.backends`; no atomics anywhere (deterministic).
"""
from __future__ import annotations

import torch

from .torch_chunked import _chunks
from ..kernels import _launch, configs, epilogue

NAME = "cublas"
OPTIONS = frozenset()  # chunks are sized by byte budgets (kernels/configs.py)
# forward_backward's largest group of fp32 logits: a bigger group takes forward + backward.
ONE_PASS_BYTES = configs.ONE_PASS_BYTES


# ---------------------------------------------------------------------------------------------
# GEMMs with fp32 results
# ---------------------------------------------------------------------------------------------

def _fp32_products(device: torch.device) -> bool:
    """Whether cuBLAS can write fp32 from 16-bit operands here (``out_dtype``, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype_out")


def _product_dtype(hidden: torch.Tensor) -> torch.dtype:
    if hidden.dtype == torch.float32 or hidden.device.type != "cuda" \
            or _fp32_products(hidden.device):
        return torch.float32
    return hidden.dtype


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False):
    """``out = a @ b`` (or ``out += a @ b``) with fp32 accumulation; ``out`` is fp32 or the
    operands' dtype (then rounded once, at the end of cuBLAS's fp32 sum)."""
    beta = 1.0 if accumulate else 0.0
    if out.dtype == a.dtype:  # beta = 0: out's old content, NaN included, is ignored
        torch.addmm(out, a, b, beta=beta, out=out)
    elif a.device.type != "cuda":  # CPU tests: the fp32 product of the same 16-bit values
        torch.addmm(out, a.float(), b.float(), beta=beta, out=out)
    elif _fp32_products(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # torch < 2.8: each chunk's product is rounded once, the running sum stays fp32
        out.add_(a @ b) if accumulate else out.copy_(a @ b)


class _Products:
    """One reused ``[rows, columns]`` buffer for GEMM-formed chunks; grows for a larger group."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.columns, self.dtype, self.device, self.buffer = columns, dtype, device, None

    def get(self, rows: int, columns: int) -> torch.Tensor:
        """A contiguous ``[rows, columns]`` view (a last, narrower chunk packs its rows)."""
        if self.buffer is None or self.buffer.numel() < rows * self.columns:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty(rows * self.columns, dtype=self.dtype, device=self.device)
        return self.buffer[:rows * columns].view(rows, columns)


def _gradient_view(product: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The in-place gradient over ``product``'s storage, in the GEMM operand dtype: the same
    elements, or (16-bit over fp32) the first half of each row's bytes."""
    if product.dtype == dtype:
        return product
    return product.view(dtype)[:, :product.shape[1]]


def _scored_hidden(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden[rows]`` ([N, H]); ``hidden`` itself, without a copy, when every row is scored
    in order (then ``rows`` is the identity: an [M, H] copy saved, 64 MB at N=8192, H=4096)."""
    if rows.numel() == hidden.shape[0] and torch.equal(
            rows, torch.arange(rows.numel(), device=rows.device)):
        return hidden
    return hidden.index_select(0, rows)


def _check(hidden, weight, bias):
    _launch.check_inputs(hidden, weight, bias)
    if bias is not None and bias.stride(0) != 1:
        raise ValueError(f"bias strides {bias.stride()}: expected a contiguous [V] bias")


# ---------------------------------------------------------------------------------------------
# The backend interface
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, chunk_bytes=None):
    """hidden [M, H], weight [V, H], bias [V] | None, rows [N], targets [N] -> 5 x [N]."""
    _check(hidden, weight, bias)
    num_rows, vocab = rows.numel(), weight.shape[0]
    state = epilogue.fold_state(1, num_rows, hidden.device, with_argmax=with_argmax,
                                with_entropy=with_entropy, with_logits_mean=with_logits_mean)
    if num_rows:
        scored = _scored_hidden(hidden, rows)
        columns = configs.product_columns(num_rows, vocab, chunk_bytes or _chunk_bytes())
        products = _Products(columns, _product_dtype(hidden), hidden.device)
        for v0 in range(0, vocab, columns):
            block = weight[v0:v0 + columns]
            product = products.get(num_rows, block.shape[0])
            _matmul(scored, block.T, product)
            epilogue.fold(product, v0, bias, targets, state, temperature=temperature,
                          softcap=softcap)
    return epilogue.statistics(state, vocab)


@torch.no_grad()
def backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, chunk_bytes=None):
    """Gradients (dH [M, H], dW [V, H], dBias [V]) in the input dtype; None where not needed.

    dW is returned contiguous whatever the layout of ``weight`` (a transposed view included).
    """
    _check(hidden, weight, bias)
    _no_filter(filter_eps)
    num_rows, (vocab, width) = rows.numel(), weight.shape
    need_bias = need_bias and bias is not None
    if num_rows == 0:
        return _zeros(hidden, weight, bias, need_hidden, need_weight, need_bias)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    scored = _scored_hidden(hidden, rows)
    mu = lse - entropy if grad_entropy is not None else None       # sum_v p z
    grad_hidden_f32 = torch.zeros(num_rows, width, **f32) if need_hidden else None
    grad_weight = torch.empty(vocab, width, dtype=weight.dtype, device=weight.device) \
        if need_weight else None
    grad_bias_f32 = torch.empty(vocab, **f32) if need_bias else None
    columns = configs.product_columns(num_rows, vocab, chunk_bytes or _chunk_bytes())
    products = _Products(columns, _product_dtype(hidden), hidden.device)
    for v0 in range(0, vocab, columns):
        block = weight[v0:v0 + columns]
        product = products.get(num_rows, block.shape[0])
        _matmul(scored, block.T, product)
        grad = _gradient_view(product, weight.dtype)
        epilogue.grad(product, grad, v0, bias, targets, lse, grad_logprobs, grad_lse,
                      grad_entropy, mu, grad_logits_mean, vocab=vocab,
                      temperature=temperature, softcap=softcap)
        if need_hidden:
            _matmul(grad, block, grad_hidden_f32, accumulate=True)
        if need_weight:
            _matmul(grad.T, scored, grad_weight[v0:v0 + block.shape[0]])
        if need_bias:
            torch.sum(grad, dim=0, dtype=torch.float32, out=grad_bias_f32[v0:v0 + block.shape[0]])
    del products  # before dH's cast: lower peak
    grad_hidden = None
    if need_hidden:
        grad_hidden = grad_hidden_f32.to(hidden.dtype)
        if scored is not hidden:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_hidden)
    return grad_hidden, grad_weight, None if grad_bias_f32 is None else grad_bias_f32.to(bias.dtype)


@torch.no_grad()
def forward_backward(hidden, weight, bias, rows, targets, head, *, boundaries=None,
                     need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
                     softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
                     with_logits_mean=False, chunk_rows=None):
    """One pass: per token chunk of whole groups, statistics, the head's upstream gradients
    and the input gradients, each logit formed once (6NHV).

    ``head(5 per-token stats of a chunk, its row slice) -> (loss of the chunk, 4 upstream
    grads)``; chunks of about ``chunk_rows`` rows (default ``configs.ONE_PASS_ROWS``) end
    only at ``boundaries``. Returns (loss, dH, dW, dBias).
    """
    _check(hidden, weight, bias)
    _no_filter(filter_eps)
    num_rows, (vocab, width) = rows.numel(), weight.shape
    device, need_bias = hidden.device, need_bias and bias is not None
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.zeros((), **f32)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight_f32 = torch.zeros(vocab, width, **f32) if need_weight else None
    grad_bias_f32 = torch.zeros(vocab, **f32) if need_bias else None
    size = chunk_rows or configs.one_pass_rows(vocab, _launch.interpreting())
    products = _Products(vocab, _product_dtype(hidden), device)
    flags = dict(with_argmax=with_argmax, with_entropy=with_entropy,
                 with_logits_mean=with_logits_mean)
    for piece in _chunks(num_rows, vocab, size, boundaries):
        piece_rows, piece_targets = rows[piece], targets[piece]
        count = piece_rows.numel()
        scored = hidden.index_select(0, piece_rows)
        product = products.get(count, vocab)
        _matmul(scored, weight.T, product)
        state = epilogue.fold_state(epilogue.fold_splits(count, vocab, device), count, device,
                                    **flags)
        epilogue.fold(product, 0, bias, piece_targets, state, temperature=temperature,
                      softcap=softcap)
        stats = epilogue.statistics(state, vocab)
        chunk_loss, (grad_logprobs, grad_lse, grad_entropy, grad_logits_mean) = \
            head(stats, piece)
        loss += chunk_loss
        if grad_logprobs is None and grad_lse is None and grad_entropy is None \
                and grad_logits_mean is None:
            continue
        mu = stats[1] - stats[3] if grad_entropy is not None else None
        grad = _gradient_view(product, weight.dtype)
        epilogue.grad(product, grad, 0, bias, piece_targets, stats[1], grad_logprobs,
                      grad_lse, grad_entropy, mu, grad_logits_mean, vocab=vocab,
                      temperature=temperature, softcap=softcap)
        if need_hidden:  # K = V: cuBLAS sums in fp32 and rounds once
            grad_hidden.index_copy_(0, piece_rows, grad @ weight)
        if need_weight:
            _matmul(grad.T, scored, grad_weight_f32, accumulate=True)
        if need_bias:
            grad_bias_f32 += grad.sum(dim=0, dtype=torch.float32)
    del products  # before dW's cast: lower peak
    return (loss, grad_hidden,
            None if grad_weight_f32 is None else grad_weight_f32.to(weight.dtype),
            None if grad_bias_f32 is None else grad_bias_f32.to(bias.dtype))


def _chunk_bytes() -> int:
    return configs.INTERPRETER_CHUNK_BYTES if _launch.interpreting() else \
        configs.CUBLAS_CHUNK_BYTES


def _no_filter(filter_eps):
    if filter_eps is not None:
        raise NotImplementedError("filter_eps with backend='cublas'")


def _zeros(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if need_bias else None)
