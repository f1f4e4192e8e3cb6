"""Backward: recompute logit tiles, form the logit gradient, accumulate dH, dW and dBias.

Two kernels, each the sole owner of the gradient rows it writes, so no atomics and bitwise
reproducible results:

- ``_logprobs_bwd_dh_kernel``, grid ``(cdiv(N, BLOCK_N),)``: token tile i walks every
  vocabulary tile and accumulates ``dH[i] += grad_logits @ W[v]`` in an fp32 buffer.
- ``_logprobs_bwd_dw_kernel``, grid ``(cdiv(V, BLOCK_V),)``: vocabulary tile j walks every
  token tile and accumulates ``dW[j] += grad_logitsᵀ @ hidden[rows]`` in fp32 (bf16
  accumulation across tiles is what degrades training quality) and ``dBias[j]``.

Each kernel recomputes the logits it needs (2 x 2NHV FLOPs of recompute in total). With
``FILTER`` a tile whose gradient is below ``filter_eps`` everywhere skips its update.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._tl_helpers import grad_logits_tile, logits_tile


@triton.jit
def _load_token_stats(offs_n, mask_n, rows_ptr, targets_ptr, lse_ptr, grad_logprobs_ptr,
                      grad_lse_ptr, grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,
                      WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr):
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_logprobs = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_entropy = lse
    mu = lse
    grad_logits_mean = lse
    if WITH_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        mu = tl.load(mu_ptr + offs_n, mask=mask_n, other=0.0)
    if WITH_MEAN_GRAD:
        grad_logits_mean = tl.load(grad_logits_mean_ptr + offs_n, mask=mask_n, other=0.0)
    return rows, targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean


@triton.jit
def _recomputed_grad_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v, targets, lse,
    grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean,
    H, stride_hm, stride_hh, stride_wv, stride_wh, inv_vocab, inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr,
    WITH_MEAN_GRAD: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Recompute one [BLOCK_N, BLOCK_V] logit tile and return its fp32 logit gradient."""
    logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v,
                         H, stride_hm, stride_hh, stride_wv, stride_wh,
                         inv_temperature, softcap, BLOCK_N, BLOCK_V, BLOCK_H,
                         HAS_BIAS, HAS_SOFTCAP, DOT_FP32, DOT_PRECISION)
    return grad_logits_tile(logits, offs_v, mask_n, mask_v, targets, lse, grad_logprobs,
                            grad_lse, grad_entropy, mu, grad_logits_mean, inv_vocab,
                            inv_temperature, softcap, HAS_SOFTCAP, WITH_ENTROPY_GRAD,
                            WITH_MEAN_GRAD)


@triton.jit
def _logprobs_bwd_dh_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr,    # [M,H] [V,H] [V] [N] [N]
    lse_ptr, grad_logprobs_ptr, grad_lse_ptr,                   # [N] fp32 each
    grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,             # [N] fp32 each
    grad_hidden_ptr,                                            # -> [N, H] fp32
    N, V, H, stride_hm, stride_hh, stride_wv, stride_wh,
    inv_vocab, inv_temperature, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, FILTER: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows, targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean = \
        _load_token_stats(offs_n, mask_n, rows_ptr, targets_ptr, lse_ptr, grad_logprobs_ptr,
                          grad_lse_ptr, grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,
                          WITH_ENTROPY_GRAD, WITH_MEAN_GRAD)
    out_rows = offs_n.to(tl.int64) * H
    for v_start in range(0, V, BLOCK_V):
        offs_v = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        grad = _recomputed_grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v, targets, lse,
            grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean,
            H, stride_hm, stride_hh, stride_wv, stride_wh, inv_vocab, inv_temperature, softcap,
            BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY_GRAD, WITH_MEAN_GRAD,
            DOT_FP32, DOT_PRECISION)
        if DOT_FP32:
            grad_op = grad
        else:
            grad_op = grad.to(weight_ptr.dtype.element_ty)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.abs(grad), axis=1), axis=0) >= filter_eps
        if keep:
            for h_start in range(0, H, BLOCK_H):
                offs_h = h_start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                weight_tile = tl.load(
                    weight_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)     # [BLOCK_V, BLOCK_H]
                if DOT_FP32:
                    weight_tile = weight_tile.to(tl.float32)
                out = grad_hidden_ptr + out_rows[:, None] + offs_h[None, :]
                out_mask = mask_n[:, None] & mask_h[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                acc = tl.dot(grad_op, weight_tile, acc, input_precision=DOT_PRECISION)
                tl.store(out, acc, mask=out_mask)


@triton.jit
def _logprobs_bwd_dw_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr,    # [M,H] [V,H] [V] [N] [N]
    lse_ptr, grad_logprobs_ptr, grad_lse_ptr,                   # [N] fp32 each
    grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,             # [N] fp32 each
    grad_weight_ptr, grad_bias_ptr,                             # -> [V, H], [V] fp32
    N, V, H, stride_hm, stride_hh, stride_wv, stride_wh,
    inv_vocab, inv_temperature, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, FILTER: tl.constexpr,
    NEED_BIAS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows, targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean = \
            _load_token_stats(offs_n, mask_n, rows_ptr, targets_ptr, lse_ptr,
                              grad_logprobs_ptr, grad_lse_ptr, grad_entropy_ptr, mu_ptr,
                              grad_logits_mean_ptr, WITH_ENTROPY_GRAD, WITH_MEAN_GRAD)
        grad = _recomputed_grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v, targets, lse,
            grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean,
            H, stride_hm, stride_hh, stride_wv, stride_wh, inv_vocab, inv_temperature, softcap,
            BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY_GRAD, WITH_MEAN_GRAD,
            DOT_FP32, DOT_PRECISION)
        if NEED_BIAS_GRAD:
            grad_bias += tl.sum(grad, axis=0)
        if DOT_FP32:
            grad_t = tl.trans(grad)
        else:
            grad_t = tl.trans(grad.to(weight_ptr.dtype.element_ty))      # [BLOCK_V, BLOCK_N]
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.abs(grad), axis=1), axis=0) >= filter_eps
        if keep:
            for h_start in range(0, H, BLOCK_H):
                offs_h = h_start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                hidden_tile = tl.load(
                    hidden_ptr + rows[:, None] * stride_hm + offs_h[None, :] * stride_hh,
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)     # [BLOCK_N, BLOCK_H]
                if DOT_FP32:
                    hidden_tile = hidden_tile.to(tl.float32)
                out = grad_weight_ptr + offs_v[:, None] * H + offs_h[None, :]
                out_mask = mask_v[:, None] & mask_h[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                acc = tl.dot(grad_t, hidden_tile, acc, input_precision=DOT_PRECISION)
                tl.store(out, acc, mask=out_mask)
    if NEED_BIAS_GRAD:
        tl.store(grad_bias_ptr + offs_v, grad_bias, mask=mask_v)


def backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, config=None):
    """Gradients (dH [M, H], dW [V, H], dBias [V]) in the input dtype; None where not needed."""
    _launch.check_inputs(hidden, weight, bias)
    num_rows, vocab, width = rows.numel(), weight.shape[0], weight.shape[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    zeros = torch.zeros(num_rows, **f32)
    with_entropy_grad = grad_entropy is not None
    with_mean_grad = grad_logits_mean is not None
    per_token = (
        lse, zeros if grad_logprobs is None else grad_logprobs,
        zeros if grad_lse is None else grad_lse,
        grad_entropy if with_entropy_grad else zeros,
        (lse - entropy) if with_entropy_grad else zeros,                # mu = sum_v p z
        grad_logits_mean if with_mean_grad else zeros,
    )
    common = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY_GRAD=with_entropy_grad, WITH_MEAN_GRAD=with_mean_grad,
        FILTER=filter_eps is not None, **_launch.dot_flags(hidden))
    scalars = (num_rows, vocab, width, hidden.stride(0), hidden.stride(1), weight.stride(0),
               weight.stride(1), 1.0 / vocab, 1.0 / temperature, softcap or 1.0,
               filter_eps or 0.0)
    bias_arg = bias if bias is not None else weight
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        cfg = config or _launch.config("bwd_dh", hidden)
        compact = torch.zeros(num_rows, width, **f32)
        _logprobs_bwd_dh_kernel[(triton.cdiv(num_rows, cfg["BLOCK_N"]),)](
            hidden, weight, bias_arg, rows, targets, *per_token, compact, *scalars,
            **common, **cfg)
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, compact.to(hidden.dtype))
    need_bias = need_bias and bias is not None
    if need_weight or need_bias:
        cfg = config or _launch.config("bwd_dw", hidden)
        # The dW kernel also produces dBias; without a weight gradient it still needs a
        # (discarded) buffer to write into.
        grad_weight_f32 = torch.zeros(vocab, width, **f32)
        grad_bias_f32 = torch.zeros(vocab, **f32) if need_bias else zeros
        _logprobs_bwd_dw_kernel[(triton.cdiv(vocab, cfg["BLOCK_V"]),)](
            hidden, weight, bias_arg, rows, targets, *per_token, grad_weight_f32,
            grad_bias_f32, *scalars, NEED_BIAS_GRAD=need_bias, **common, **cfg)
        grad_weight = grad_weight_f32.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias_f32.to(bias.dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias
