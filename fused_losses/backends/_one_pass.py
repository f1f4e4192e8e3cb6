"""The one-pass (6NHV) loop shared by the cuBLAS and the fused Triton backends.

For a loss whose upstream gradients are known in forward (``forward_backward`` of
:mod:`fused_losses.backends`), every logit is formed once. Per token chunk of whole groups
(about ``configs.ONE_PASS_ROWS`` rows) over all of V:

1. ``products [n, V]`` fp32 ``= hidden[chunk] @ weight.T`` (GEMM 1, 2nHV);
2. ``epilogue.fold``: the chunk's five per-token statistics;
3. ``head(stats, piece)``: the chunk's loss and upstream gradients;
4. ``epilogue.grad``: the logit gradient, in place over the products in the GEMM operand
   dtype (fp16 rows divided by their bound, :class:`RowScale`);
5. ``dH[chunk] = G @ weight`` (GEMM 2, K = V) in fp32, unscaled, cast once;
6. ``dW += Gᵀ @ hidden[chunk]`` into an fp32 ``[V, H]`` accumulator (GEMM 3, K = n).

The backends differ only in who runs the three GEMMs (:class:`Gemms`). The price of 6NHV is
memory: the ``[n, V]`` fp32 products and the fp32 dW accumulator (``benchmarks/notes.md``, G5).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ..kernels import _launch, configs, epilogue, scaling
from ._gemm import matmul
from .torch_chunked import _chunks


class RowScale(NamedTuple):
    """The fp16 gradient chunk's per-token scaling (``kernels/scaling.py``): row i is stored
    as ``grad_i / bound_i``; dH rows are multiplied back by ``bound`` in fp32; a GEMM that sums
    over tokens takes its other operand times ``ratio = bound / max_bound`` (in [0, 1], safe
    in fp16) and multiplies its fp32 result by ``max_bound``."""

    bound: torch.Tensor       # [n] fp32
    ratio: torch.Tensor       # [n] fp32
    max_bound: torch.Tensor   # [1] fp32, on the device

    @classmethod
    def of(cls, dtype, grad_logprobs, grad_lse, grad_entropy, grad_logits_mean, entropy,
           vocab: int):
        """The scaling of a chunk in ``dtype``; None where none is needed (bf16, fp32)."""
        if not scaling.needs_row_scale(dtype):
            return None
        return cls.from_bound(scaling.grad_bound(grad_logprobs, grad_lse, grad_entropy,
                                                 grad_logits_mean, entropy, vocab))

    @classmethod
    def from_bound(cls, bound: torch.Tensor) -> "RowScale":
        """The scaling by a per-token ``bound`` [n] fp32 (``kernels/scaling.py``); the
        maximum stays on the device."""
        max_bound = bound.max().reshape(1)
        return cls(bound, bound / max_bound, max_bound)

    def scaled_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [n, H] * ratio`` in ``rows``' dtype: the other operand of a token-sum GEMM."""
        return (rows.float() * self.ratio.unsqueeze(1)).to(rows.dtype)

    def alpha(self) -> float:
        """``max_bound`` as a host scalar, for a library GEMM's alpha (a host sync)."""
        return float(self.max_bound)


def column_sums(grad: torch.Tensor, scale: RowScale | None) -> torch.Tensor:
    """``sum_i grad_i`` over a chunk's rows ([C] fp32; dBias), unscaled."""
    if scale is None:
        return grad.sum(dim=0, dtype=torch.float32)
    out = torch.empty(1, grad.shape[1], dtype=torch.float32, device=grad.device)
    matmul(scale.ratio.to(grad.dtype).unsqueeze(0), grad, out, alpha=scale.alpha())
    return out[0]


class Gemms(Protocol):
    """The three GEMMs of a chunk; ``operand`` is whatever :meth:`rows` returned for it."""

    def rows(self, hidden: torch.Tensor, rows: torch.Tensor):
        """The chunk's hidden rows as this implementation's GEMMs take them."""

    def products(self, operand, weight: torch.Tensor, out: torch.Tensor) -> None:
        """``out [n, V]`` fp32 ``= hidden[rows] @ weight.T``."""

    def grad_hidden(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``grad [n, V] @ weight`` as a fresh fp32 ``[n, H]``."""

    def grad_weight(self, grad: torch.Tensor, operand, accumulator: torch.Tensor,
                    scale: RowScale | None) -> None:
        """``accumulator [V, H]`` fp32 ``+= gradᵀ @ hidden[rows]``, the gradient unscaled."""


def gradient_view(product: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The in-place gradient over ``product``'s storage, in the GEMM operand dtype: the same
    elements, or (16-bit over fp32) the first half of each row's bytes."""
    if product.dtype == dtype:
        return product
    return product.view(dtype)[:, :product.shape[1]]


class Products:
    """One reused ``[rows, columns]`` buffer for GEMM-formed chunks; grows for a larger group."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.columns, self.dtype, self.device, self.buffer = columns, dtype, device, None

    def get(self, rows: int, columns: int) -> torch.Tensor:
        """A contiguous ``[rows, columns]`` view (a last, narrower chunk packs its rows)."""
        if self.buffer is None or self.buffer.numel() < rows * self.columns:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty(rows * self.columns, dtype=self.dtype, device=self.device)
        return self.buffer[:rows * columns].view(rows, columns)


def sweep(gemms: Gemms, product_dtype: torch.dtype, hidden, weight, bias, rows, chunks,
          chunk_gradient, *, need_hidden=True, need_weight=True, need_bias=True):
    """Steps 1, 5 and 6 over token ``chunks`` (slices of ``rows``), with the chunk's own
    steps 2-4 left to ``chunk_gradient(piece, product) -> (loss, grad, scale)``: given the
    chunk's fp32 products ``[n, V]`` it returns the chunk's loss (a 0-dim tensor) and the
    logit gradient it wrote in place (a :func:`gradient_view` of ``product``; None when the
    chunk has no gradient) with its fp16 :class:`RowScale` (or None). The distillation
    primitive's cuBLAS implementation forms a teacher chunk beside each product here.
    Returns (loss, dH, dW, dBias) in the inputs' dtypes."""
    vocab, width = weight.shape
    device, need_bias = hidden.device, need_bias and bias is not None
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.zeros((), **f32)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight_f32 = torch.zeros(vocab, width, **f32) if need_weight else None
    grad_bias_f32 = torch.zeros(vocab, **f32) if need_bias else None
    products = Products(vocab, product_dtype, device)

    def add_chunk(piece) -> torch.Tensor:
        # A function, not the loop's body, so that the chunk's operand, its views of the
        # products and its dH rows die on return: the next chunk's are made without them,
        # and the products buffer is free before dW's cast.
        piece_rows = rows[piece]
        operand = gemms.rows(hidden, piece_rows)
        product = products.get(piece_rows.numel(), vocab)
        gemms.products(operand, weight, product)
        chunk_loss, grad, scale = chunk_gradient(piece, product)
        if grad is None:
            return chunk_loss
        if need_hidden:
            rows_f32 = gemms.grad_hidden(grad, weight)
            if scale is not None:
                rows_f32.mul_(scale.bound.unsqueeze(1))
            grad_hidden.index_copy_(0, piece_rows, rows_f32.to(hidden.dtype))
            del rows_f32  # not beside dW's GEMM
        if need_weight:
            gemms.grad_weight(grad, operand, grad_weight_f32, scale)
        if need_bias:
            grad_bias_f32.add_(column_sums(grad, scale))
        return chunk_loss

    for piece in chunks:
        loss += add_chunk(piece)
    del products  # before dW's cast: lower peak
    return (loss, grad_hidden,
            None if grad_weight_f32 is None else grad_weight_f32.to(weight.dtype),
            None if grad_bias_f32 is None else grad_bias_f32.to(bias.dtype))


def run(gemms: Gemms, product_dtype: torch.dtype, hidden, weight, bias, rows, targets, head, *,
        boundaries=None, need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
        softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
        with_logits_mean=False, chunk_rows=None):
    """The interface's ``forward_backward`` with ``gemms``: returns (loss, dH, dW, dBias)."""
    vocab, device = weight.shape[0], hidden.device
    flags = dict(with_argmax=with_argmax, with_entropy=with_entropy,
                 with_logits_mean=with_logits_mean)

    def chunk_gradient(piece, product):
        piece_targets = targets[piece]
        count = piece_targets.numel()
        state = epilogue.fold_state(epilogue.fold_splits(count, vocab, device), count, device,
                                    **flags)
        epilogue.fold(product, 0, bias, piece_targets, state, vocab=vocab,
                      temperature=temperature, softcap=softcap)
        stats = epilogue.statistics(state, vocab)
        chunk_loss, (grad_logprobs, grad_lse, grad_entropy, grad_logits_mean) = \
            head(stats, piece)
        if grad_logprobs is None and grad_lse is None and grad_entropy is None \
                and grad_logits_mean is None:
            return chunk_loss, None, None
        mu = stats[1] - stats[3] if grad_entropy is not None else None   # sum_v p z
        scale = RowScale.of(weight.dtype, grad_logprobs, grad_lse, grad_entropy,
                            grad_logits_mean, stats[3], vocab)
        grad = gradient_view(product, weight.dtype)
        epilogue.grad(product, grad, 0, bias, piece_targets, stats[1], grad_logprobs,
                      grad_lse, grad_entropy, mu, grad_logits_mean, vocab=vocab,
                      temperature=temperature, softcap=softcap, filter_eps=filter_eps,
                      inv_bound=None if scale is None else 1.0 / scale.bound)
        return chunk_loss, grad, scale

    size = chunk_rows or configs.one_pass_rows(vocab, _launch.interpreting())
    return sweep(gemms, product_dtype, hidden, weight, bias, rows,
                 _chunks(rows.numel(), vocab, size, boundaries), chunk_gradient,
                 need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
