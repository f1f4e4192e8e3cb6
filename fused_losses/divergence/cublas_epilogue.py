"""cuBLAS GEMMs on chunks of both heads, folded by fused Triton epilogues: ``backend="cublas"``.

The log-prob primitive's cuBLAS backend (``fused_losses/backends/cublas_epilogue.py``) with a
teacher beside the student, on its loops (``vocabulary_products``, ``vocabulary_sweep``,
``_one_pass.sweep``). Each chunk's two GEMMs are ``torch.mm`` into fp32 (``backends/_gemm.py``:
cuBLAS with ``out_dtype=torch.float32`` from 16-bit operands, torch >= 2.8 on CUDA; each head in
its own compute dtype); the epilogues of ``kernels/divergence_epilogue.py`` read each fp32 pair
once per pass, applying biases and ``1/τ`` on the fly and the per-tile math of the fused
kernels (``kernels/divergence.py``, whose docstring derives it).

* ``forward``: vocabulary chunks of every scored row, ``[N, C]`` fp32 per head, C from
  ``configs.CUBLAS_CHUNK_BYTES`` per head; ``fold`` merges each pair into both models' online
  statistics. JSD needs a second sweep that recomputes both chunks and sums S and R with the
  lse known (why: ``kernels/divergence.py``). 2N(H + H_t)V FLOPs; 4N(H + H_t)V for JSD.
* ``backward``: the same chunks recomputed; the student's turns into its logit gradient in
  place (in its GEMM operand dtype), then ``dH += G @ W[chunk]`` into fp32 ``[N, H]`` and
  ``dW[chunk] = Gᵀ @ hidden`` (K = N, written once). 2N(H + H_t)V + 4NHV.
* ``forward_backward`` (``linear_divergence_loss``'s default path here): token chunks of
  ``configs.ONE_PASS_ROWS`` rows over all of V, ``[n, V]`` fp32 per head. A chunk holds whole
  rows, so one fold gives exact statistics and JSD's second pass re-reads the two buffers
  instead of forming them again; then the gradient in place, ``dH[chunk] = G @ W`` (K = V) and
  ``dW += Gᵀ @ hidden[chunk]`` into an fp32 ``[V, H]`` accumulator. 2N(H + H_t)V + 4NHV for
  every kind: each logit of each head formed once. The price is memory: two ``[n, V]`` fp32
  buffers (1.05 GB at n = 1024, V = 128256) and the accumulator (4VH).

On the CPU the GEMMs are torch's and the epilogues run under ``TRITON_INTERPRET=1``: that is
how the tests run it. fp16 gradient chunks are scaled per token by
``scaling.divergence_grad_bound``; cuBLAS takes dW's scale as a host scalar (one host sync per
backward, per chunk in the one pass), as in the log-prob backend. Non-finite logits follow
``fused_losses.divergence``. Imported only when chosen (it imports Triton).
"""
from __future__ import annotations

import torch

from ..backends import _one_pass
from ..backends._gemm import matmul, product_dtype
from ..backends._one_pass import Products, RowScale, gradient_view
from ..backends.cublas_epilogue import (_chunk_bytes, _CublasGemms, _scored_hidden,
                                        vocabulary_products, vocabulary_sweep)
from ..backends.torch_chunked import _chunks
from ..kernels import _launch, configs, divergence_epilogue, scaling
from ..kernels import divergence as tiles
from .torch_chunked import finite_or_nan


def _check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias):
    """Input checks; the biases the epilogues index as ``ptr + offs``, contiguous."""
    tiles.check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    return _launch.contiguous(bias, teacher_bias)


def _row_scale(dtype, kind, beta, temperature, aux, grad_divergence, grad_logprobs):
    """fp16 gradient chunks' per-token scaling (``kernels/scaling.py``); None otherwise."""
    if not scaling.needs_row_scale(dtype) or (grad_divergence is None
                                              and grad_logprobs is None):
        return None
    return RowScale.from_bound(scaling.divergence_grad_bound(
        kind, beta, temperature, aux, grad_divergence, grad_logprobs))


def _chunk_pairs(scored, weight, teacher_scored, teacher_weight, columns):
    """(v0, student products, teacher products) per vocabulary chunk of ``columns``: both
    heads' GEMMs, ``[N, C]`` each, in two reused buffers."""
    student = vocabulary_products(scored, weight, columns,
                                  Products(columns, product_dtype(scored), scored.device))
    teacher = vocabulary_products(teacher_scored, teacher_weight, columns,
                                  Products(columns, product_dtype(teacher_scored),
                                           scored.device))
    for (v0, _, product), (_, _, teacher_product) in zip(student, teacher):
        yield v0, product, teacher_product


@torch.no_grad()
def forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
            *, kind, beta, temperature, with_logprobs, chunk_bytes=None):
    """Per-token (divergence, logprobs | None, lse, teacher_lse, raw_lse | None, aux | None),
    [N] fp32 each, as ``fused_losses.divergence.torch_chunked.forward``."""
    bias, teacher_bias = _check(hidden, weight, bias, teacher_hidden, teacher_weight,
                                teacher_bias)
    num_rows, vocab = rows.numel(), weight.shape[0]
    with_raw_lse = with_logprobs and temperature != 1.0
    if num_rows == 0:
        return tiles.empty_statistics(kind, with_logprobs, with_raw_lse, hidden.device)
    heads = (_scored_hidden(hidden, rows), weight, _scored_hidden(teacher_hidden, rows),
             teacher_weight, configs.product_columns(num_rows, vocab,
                                                     chunk_bytes or _chunk_bytes()))
    state = tiles.pair_state(1, num_rows, hidden.device, kind=kind,
                             with_logprobs=with_logprobs, with_raw_lse=with_raw_lse)
    for v0, product, teacher_product in _chunk_pairs(*heads):
        divergence_epilogue.fold(product, teacher_product, v0, bias, teacher_bias, targets,
                                 state, kind=kind, temperature=temperature)
    stats = tiles.pair_statistics(kind, state)
    if kind != "jsd":
        return stats
    sums = tuple(torch.zeros(1, num_rows, dtype=torch.float32, device=hidden.device)
                 for _ in range(2))
    for v0, product, teacher_product in _chunk_pairs(*heads):
        divergence_epilogue.mixture_fold(product, teacher_product, v0, bias, teacher_bias,
                                         stats[2], stats[3], sums, beta=beta,
                                         temperature=temperature)
    return tiles.mixture_statistics(beta, *sums, stats)


@torch.no_grad()
def backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
             stats, grad_divergence, grad_logprobs, *, kind, beta, temperature, with_logprobs,
             need_hidden=True, need_weight=True, need_bias=True, chunk_bytes=None):
    """(dH [M, H], dW [V, H] contiguous, dBias [V]) of the student, in its dtypes; None where
    not needed. ``stats``: the forward's (``lse``, ``teacher_lse``, ``raw_lse``, ``aux`` are
    read); ``grad_divergence`` / ``grad_logprobs`` [N] fp32 or None, of any strides."""
    bias, teacher_bias = _check(hidden, weight, bias, teacher_hidden, teacher_weight,
                                teacher_bias)
    num_rows, vocab = rows.numel(), weight.shape[0]
    scale = _row_scale(weight.dtype, kind, beta, temperature, stats.aux, grad_divergence,
                       grad_logprobs) if num_rows else None
    inv_bound = None if scale is None else 1.0 / scale.bound
    columns = configs.product_columns(num_rows, vocab, chunk_bytes or _chunk_bytes())
    teacher_scored = _scored_hidden(teacher_hidden, rows) if num_rows else teacher_hidden
    teacher_products = Products(columns, product_dtype(teacher_hidden), hidden.device)

    def chunk_gradient(v0, product):
        teacher_product = teacher_products.get(num_rows, product.shape[1])
        matmul(teacher_scored, teacher_weight[v0:v0 + product.shape[1]].T, teacher_product)
        grad = gradient_view(product, weight.dtype)
        divergence_epilogue.grad(
            product, grad, teacher_product, v0, bias, teacher_bias, targets, stats.lse,
            stats.teacher_lse, stats.raw_lse, stats.aux, grad_divergence, grad_logprobs,
            kind=kind, beta=beta, temperature=temperature, inv_bound=inv_bound)
        return grad

    return vocabulary_sweep(
        hidden, weight, bias, rows, scale, chunk_gradient, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias, columns=columns)


@torch.no_grad()
def forward_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                     targets, *, divergence_weight, logprob_weight, kind, beta, temperature,
                     with_logprobs, need_hidden=True, need_weight=True, need_bias=True,
                     chunk_rows=None):
    """One pass for ``loss = Σ_rows divergence_weight·D + logprob_weight·logprobs``: per token
    chunk both heads' logits are formed once, for the statistics and the gradient. Returns
    (loss, stats as in ``forward``, dH, dW, dBias); chunks of about ``chunk_rows`` rows
    (default ``configs.ONE_PASS_ROWS``)."""
    bias, teacher_bias = _check(hidden, weight, bias, teacher_hidden, teacher_weight,
                                teacher_bias)
    vocab, device = weight.shape[0], hidden.device
    with_raw_lse = with_logprobs and temperature != 1.0
    teacher_products = Products(vocab, product_dtype(teacher_hidden), device)
    parts = []

    def chunk_gradient(piece, product):
        piece_targets = targets[piece]
        count = piece_targets.numel()
        teacher_product = teacher_products.get(count, vocab)
        matmul(teacher_hidden.index_select(0, rows[piece]), teacher_weight.T, teacher_product)
        splits = divergence_epilogue.fold_splits(count, vocab, device)
        state = tiles.pair_state(splits, count, device, kind=kind, with_logprobs=with_logprobs,
                                 with_raw_lse=with_raw_lse)
        divergence_epilogue.fold(product, teacher_product, 0, bias, teacher_bias,
                                 piece_targets, state, kind=kind, temperature=temperature)
        stats = tiles.pair_statistics(kind, state)
        if kind == "jsd":  # the second pass reads the same two buffers: no GEMM
            sums = tuple(torch.zeros(splits, count, dtype=torch.float32, device=device)
                         for _ in range(2))
            divergence_epilogue.mixture_fold(product, teacher_product, 0, bias, teacher_bias,
                                             stats[2], stats[3], sums, beta=beta,
                                             temperature=temperature)
            stats = tiles.mixture_statistics(beta, *sums, stats)
        parts.append(stats)
        chunk_loss = divergence_weight * stats[0].sum()
        grad_divergence = finite_or_nan(torch.full_like(stats[0], divergence_weight), stats[0])
        grad_logprobs = None
        if with_logprobs:
            chunk_loss = chunk_loss + logprob_weight * stats[1].sum()
            grad_logprobs = torch.full_like(stats[0], logprob_weight)
        scale = _row_scale(weight.dtype, kind, beta, temperature, stats[5], grad_divergence,
                           grad_logprobs)
        grad = gradient_view(product, weight.dtype)
        divergence_epilogue.grad(
            product, grad, teacher_product, 0, bias, teacher_bias, piece_targets, *stats[2:],
            grad_divergence, grad_logprobs, kind=kind, beta=beta, temperature=temperature,
            inv_bound=None if scale is None else 1.0 / scale.bound)
        return chunk_loss, grad, scale

    size = chunk_rows or configs.one_pass_rows(vocab, _launch.interpreting())
    loss, *grads = _one_pass.sweep(
        _CublasGemms, product_dtype(hidden), hidden, weight, bias, rows,
        _chunks(rows.numel(), vocab, size), chunk_gradient, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias)
    stats = tiles.empty_statistics(kind, with_logprobs, with_raw_lse, device) if not parts \
        else tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))
    return (loss, stats, *grads)
