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

On the CPU the GEMMs are torch's (``_gemm.py``: 16-bit operands upcast, the fp32 products of
the same values) and the epilogues run under ``TRITON_INTERPRET=1``; that is how the tests run
it. Without ``out_dtype`` (torch < 2.8 on CUDA) the products are rounded to the input dtype
before the epilogue (error about ``|z| * 2**-8`` in bf16 logits). fp16 gradient chunks are
scaled per token (``kernels/scaling.py``); cuBLAS takes the scale of the dW GEMM as a host
scalar, so fp16 costs one host sync per backward (per chunk in the one pass).
The interface of :mod:`fused_losses.backends`; no atomics anywhere (deterministic).
"""
from __future__ import annotations

import torch

from ..kernels import _launch, configs, epilogue
from ._gemm import matmul, product_dtype
from ._one_pass import Products, RowScale, column_sums, gradient_view, run

NAME = "cublas"
OPTIONS = frozenset()  # chunks are sized by byte budgets (kernels/configs.py)
# forward_backward's largest group of fp32 logits: a bigger group takes forward + backward.
ONE_PASS_BYTES = configs.ONE_PASS_BYTES


def _scored_hidden(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden[rows]`` ([N, H]); ``hidden`` itself, without a copy, when every row is scored
    in order (then ``rows`` is the identity: an [M, H] copy saved, 64 MB at N=8192, H=4096)."""
    if rows.numel() == hidden.shape[0] and torch.equal(
            rows, torch.arange(rows.numel(), device=rows.device)):
        return hidden
    return hidden.index_select(0, rows)


def _check(hidden, weight, bias):
    """Input checks; the bias the epilogues index as ``ptr + offs``, contiguous."""
    _launch.check_inputs(hidden, weight, bias)
    return None if bias is None else bias.contiguous()


def vocabulary_products(scored: torch.Tensor, weight: torch.Tensor, columns: int,
                        products: Products):
    """Yield ``(v0, weight[v0:v0 + C], product)`` per vocabulary chunk of ``columns``, in
    increasing order: ``product [N, C] = scored @ weight[v0:v0 + C].T`` in ``products``' dtype
    (fp32 wherever it can be had), in one reused buffer (each chunk is consumed before the
    next is formed)."""
    for v0 in range(0, weight.shape[0], columns):
        block = weight[v0:v0 + columns]
        product = products.get(scored.shape[0], block.shape[0])
        matmul(scored, block.T, product)
        yield v0, block, product


def vocabulary_sweep(hidden, weight, bias, rows, scale, chunk_gradient, *,
                     need_hidden=True, need_weight=True, need_bias=True, columns: int):
    """The recompute backward's loop: per vocabulary chunk, the products of every scored row
    (``hidden[rows]``), ``chunk_gradient(v0, product) -> grad`` (the chunk's logit
    gradient written in place, a ``gradient_view`` of ``product``, rows divided by
    ``scale.bound`` when ``scale`` is given), then ``dH += G @ W[chunk]`` into an fp32
    ``[N, H]`` accumulator, ``dW[chunk] = Gᵀ @ scored`` (K = N: written once, no fp32 [V, H]
    buffer) and ``dBias[chunk]``. The distillation primitive's cuBLAS implementation forms the
    teacher's chunk in its ``chunk_gradient``. Returns (dH [M, H], dW [V, H] contiguous,
    dBias [V]) in the inputs' dtypes; None where not needed."""
    num_rows, (vocab, width) = rows.numel(), weight.shape
    need_bias = need_bias and bias is not None
    if num_rows == 0:
        return _zeros(hidden, weight, bias, need_hidden, need_weight, need_bias)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # Gathered here, not by the caller: an argument the caller formed stays alive until this
    # returns wherever CPython does not hand it over (a frame-evaluation hook such as
    # torch.compile's, once installed, keeps the caller's reference), defeating its release
    # below.
    scored = _scored_hidden(hidden, rows)
    # dW's other operand and alpha: the scored rows, or for fp16 their scaled copy
    rows_for_weight, alpha = (scored, 1.0) if scale is None else \
        (scale.scaled_rows(scored), scale.alpha())
    grad_hidden_f32 = torch.zeros(num_rows, width, **f32) if need_hidden else None
    grad_weight = torch.empty(vocab, width, dtype=weight.dtype, device=weight.device) \
        if need_weight else None
    grad_bias_f32 = torch.empty(vocab, **f32) if need_bias else None
    products = Products(columns, product_dtype(hidden), hidden.device)
    for v0, block, product in vocabulary_products(scored, weight, columns, products):
        grad = chunk_gradient(v0, product)
        if need_hidden:
            matmul(grad, block, grad_hidden_f32, accumulate=True)
        if need_weight:
            matmul(grad.T, rows_for_weight, grad_weight[v0:v0 + block.shape[0]], alpha=alpha)
        if need_bias:
            grad_bias_f32[v0:v0 + block.shape[0]] = column_sums(grad, scale)
    scatter = scored is not hidden
    # Before dH's cast and scatter, free what the loop no longer needs: the products (the
    # loop's names still view their buffer) and the gathered rows; the fp32 dH goes once
    # cast, before the scatter's zeros_like.
    products = product = grad = scored = rows_for_weight = None
    grad_hidden = None
    if need_hidden:
        if scale is not None:
            grad_hidden_f32.mul_(scale.bound.unsqueeze(1))
        grad_hidden = grad_hidden_f32.to(hidden.dtype)
        grad_hidden_f32 = None
        if scatter:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_hidden)
    return grad_hidden, grad_weight, None if grad_bias_f32 is None else grad_bias_f32.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# The backend interface
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, chunk_bytes=None):
    """hidden [M, H], weight [V, H], bias [V] | None, rows [N], targets [N] -> 5 x [N]."""
    bias = _check(hidden, weight, bias)
    num_rows, vocab = rows.numel(), weight.shape[0]
    state = epilogue.fold_state(1, num_rows, hidden.device, with_argmax=with_argmax,
                                with_entropy=with_entropy, with_logits_mean=with_logits_mean)
    if num_rows:
        columns = configs.product_columns(num_rows, vocab, chunk_bytes or _chunk_bytes())
        products = Products(columns, product_dtype(hidden), hidden.device)
        for v0, _, product in vocabulary_products(_scored_hidden(hidden, rows), weight,
                                                  columns, products):
            epilogue.fold(product, v0, bias, targets, state, vocab=vocab,
                          temperature=temperature, softcap=softcap)
    return epilogue.statistics(state, vocab)


@torch.no_grad()
def backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, chunk_bytes=None):
    """Gradients (dH [M, H], dW [V, H], dBias [V]) in the input dtype; None where not needed.

    dW is returned contiguous whatever the layout of ``weight`` (a transposed view included).
    """
    bias = _check(hidden, weight, bias)
    num_rows, vocab = rows.numel(), weight.shape[0]
    mu = lse - entropy if grad_entropy is not None else None       # sum_v p z
    scale = RowScale.of(weight.dtype, grad_logprobs, grad_lse, grad_entropy, grad_logits_mean,
                        entropy, vocab) if num_rows else None

    def chunk_gradient(v0, product):
        grad = gradient_view(product, weight.dtype)
        epilogue.grad(product, grad, v0, bias, targets, lse, grad_logprobs, grad_lse,
                      grad_entropy, mu, grad_logits_mean, vocab=vocab,
                      temperature=temperature, softcap=softcap, filter_eps=filter_eps,
                      inv_bound=None if scale is None else 1.0 / scale.bound)
        return grad

    return vocabulary_sweep(
        hidden, weight, bias, rows, scale, chunk_gradient, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias,
        columns=configs.product_columns(num_rows, vocab, chunk_bytes or _chunk_bytes()))


class _CublasGemms:
    """The one pass's GEMMs by cuBLAS: hidden rows gathered once per chunk."""

    @staticmethod
    def rows(hidden, rows):
        return hidden.index_select(0, rows)

    @staticmethod
    def products(scored, weight, out):
        matmul(scored, weight.T, out)

    @staticmethod
    def grad_hidden(grad, weight):  # K = V: one fp32 sum, rounded by the caller once
        out = torch.empty(grad.shape[0], weight.shape[1], dtype=torch.float32,
                          device=grad.device)
        matmul(grad, weight, out)
        return out

    @staticmethod
    def grad_weight(grad, scored, accumulator, scale):
        if scale is None:
            matmul(grad.T, scored, accumulator, accumulate=True)
        else:
            matmul(grad.T, scale.scaled_rows(scored), accumulator, accumulate=True,
                   alpha=scale.alpha())


@torch.no_grad()
def forward_backward(hidden, weight, bias, rows, targets, head, *, boundaries=None,
                     need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
                     softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
                     with_logits_mean=False, chunk_rows=None):
    """One pass (``_one_pass.run``): per token chunk of whole groups, statistics, the head's
    upstream gradients and the input gradients, each logit formed once (6NHV).

    ``head(5 per-token stats of a chunk, its row slice) -> (loss of the chunk, 4 upstream
    grads)``; chunks of about ``chunk_rows`` rows (default ``configs.ONE_PASS_ROWS``) end
    only at ``boundaries``. Returns (loss, dH, dW, dBias).
    """
    bias = _check(hidden, weight, bias)
    return run(_CublasGemms, product_dtype(hidden), hidden, weight, bias, rows, targets, head,
               boundaries=boundaries, need_hidden=need_hidden, need_weight=need_weight,
               need_bias=need_bias, temperature=temperature, softcap=softcap,
               filter_eps=filter_eps, with_argmax=with_argmax, with_entropy=with_entropy,
               with_logits_mean=with_logits_mean, chunk_rows=chunk_rows)


def _chunk_bytes() -> int:
    return configs.INTERPRETER_CHUNK_BYTES if _launch.interpreting() else \
        configs.CUBLAS_CHUNK_BYTES


def _zeros(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if need_bias else None)
