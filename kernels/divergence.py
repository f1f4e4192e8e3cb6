"""Distillation kernels: both models' logit tiles, their online statistics, and the student's
logit gradient, without an ``[N, V]`` tensor of either model.

Notation (``fused_losses/divergence``): ``z`` the student's raw logits, ``s = z/τ``, ``t`` the
teacher's logits divided by τ, each from its own head; ``log q = s − lse_s``,
``log p = t − lse_t``; ``KIND`` 0 forward KL(P‖Q), 1 reverse KL(Q‖P), 2 JSD with mixture
``M = βP + (1−β)Q``, ``d = log p − log q + log(β/(1−β))``, so ``log M = log((1−β)q) + σ⁺(d)``.

Forward, grid ``(cdiv(N, BLOCK_N), SPLITS)``: program (i, s) owns token tile i and the s-th
contiguous range of vocabulary tiles; it writes one partial per (split, token), merged on the
host in O(SPLITS·N). No atomics.

1. ``_divergence_stats_kernel`` forms both tiles and keeps, per token, the online log-sum-exp of
   s and of t (running max m and ``Σ exp(x − m)``) and the one running sum the divergence needs,
   rescaled by ``exp(m_old − m_new)`` whenever its max moves, exactly like the sums:

       forward_kl   A = Σ exp(t − m_t)·(t − s)     D = A / Σ exp(t − m_t) − lse_t + lse_s
       reverse_kl   A = Σ exp(s − m_s)·(s − t)     D = A / Σ exp(s − m_s) − lse_s + lse_t

   With log-probs it also takes the target's raw logit and, when τ ≠ 1, the online lse of z.
2. JSD only, ``_mixture_stats_kernel``: a second pass over both tiles with lse_s and lse_t
   known, summing ``S = Σ q σ⁺(d)`` and ``R = Σ p σ⁺(−d)``; then
   ``D = H(β) − β R − (1−β) S`` with ``H(β) = −β log β − (1−β) log(1−β)``.
   Why a second pass: each ``log M_v`` mixes two terms scaled by *different*, still unknown
   normalisers, so a running sum of a function of ``log M`` cannot be corrected when either
   running max moves (sums of ``exp(x − m)·g(x)`` can, by one common factor). Keeping the tiles
   would be the ``[N, V]`` tensor; folding the pass into backward cannot work either, since the
   gradient needs S before its first tile and the forward must return D. So JSD's forward forms
   both GEMMs twice: ``4N(H + H_t)V`` FLOPs against ``2N(H + H_t)V`` for the KL kinds.

Backward, per vocabulary chunk of ``VC`` columns (sized like ``logprobs_bwd``'s):
``_divergence_grad_kernel`` (grid ``cdiv(N, BLOCK_N)·cdiv(VC, BLOCK_V)``, grouped order)
recomputes both tiles from the forward's [N] statistics and writes dL/dz into
``grad_chunk [N, VC]`` in the student weight's dtype (and column sums for dBias); then
``logprobs_bwd``'s ``grad_hidden_gemm`` and ``grad_weight_gemm`` turn the chunk into dH
and dW. The teacher is only read. ``2N(H + H_t)V + 4NHV`` FLOPs.

    dL/dz = g_D/τ · dD/ds + g_lp · (onehot(y) − softmax(z)),
    dD/ds = q − p  |  −q (log p − log q + D)  |  −(1−β) q (σ⁺(d) − S)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch, configs, scaling
from ._tl_helpers import grouped_tile, logits_tile
from .logprobs_bwd import grad_hidden_gemm, grad_weight_gemm

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _both_tiles(
    hidden_ptr, weight_ptr, bias_ptr,                          # student [M, H] [V, H] [V]
    teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,  # teacher [M, HT] [V, HT] [V]
    rows, offs_v, mask_n, mask_v, H, HT,
    stride_hm, stride_hh, stride_wv, stride_wh,
    stride_thm, stride_thh, stride_twv, stride_twh,
    inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, TEACHER_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(raw student logits z, teacher logits / τ), [BLOCK_N, BLOCK_V] fp32 each."""
    raw = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v,
                      H, stride_hm, stride_hh, stride_wv, stride_wh, 1.0, 1.0,
                      BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, False, DOT_FP32, DOT_PRECISION)
    teacher = logits_tile(teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr, rows, offs_v,
                          mask_n, mask_v, HT, stride_thm, stride_thh, stride_twv, stride_twh,
                          inv_temperature, 1.0, BLOCK_N, BLOCK_V, BLOCK_H, HAS_TEACHER_BIAS,
                          False, TEACHER_DOT_FP32, DOT_PRECISION)
    return raw, teacher


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) for any x: the tail log(1 + exp(−|x|)) is below 2⁻²⁴ exactly where
    it rounds to 0, so no log1p is needed."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _divergence_stats_kernel(
    hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,
    rows_ptr, targets_ptr,                                      # [N] each
    max_ptr, sum_ptr, teacher_max_ptr, teacher_sum_ptr,         # -> [SPLITS, N] each
    gap_ptr, raw_max_ptr, raw_sum_ptr, target_ptr,              # -> [SPLITS, N] each
    N, V, H, HT, tiles_per_split,
    stride_hm, stride_hh, stride_wv, stride_wh,
    stride_thm, stride_thh, stride_twv, stride_twh,
    inv_temperature,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    WITH_LOGPROBS: tl.constexpr, WITH_RAW_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, TEACHER_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)

    s_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    raw_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    raw_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        raw, teacher = _both_tiles(
            hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr,
            teacher_bias_ptr, rows, offs_v, mask_n, mask_v, H, HT,
            stride_hm, stride_hh, stride_wv, stride_wh, stride_thm, stride_thh, stride_twv,
            stride_twh, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_TEACHER_BIAS,
            DOT_FP32, TEACHER_DOT_FP32, DOT_PRECISION)
        student = raw * inv_temperature
        s_or_ninf = tl.where(mask_v[None, :], student, float("-inf"))
        t_or_ninf = tl.where(mask_v[None, :], teacher, float("-inf"))
        s_new = tl.maximum(s_max, tl.max(s_or_ninf, axis=1))
        s_rescale = tl.exp(s_max - s_new)
        s_exp = tl.exp(s_or_ninf - s_new[:, None])              # 0 on masked columns
        s_sum = s_sum * s_rescale + tl.sum(s_exp, axis=1)
        t_new = tl.maximum(t_max, tl.max(t_or_ninf, axis=1))
        t_rescale = tl.exp(t_max - t_new)
        t_exp = tl.exp(t_or_ninf - t_new[:, None])
        t_sum = t_sum * t_rescale + tl.sum(t_exp, axis=1)
        if KIND == 0:   # forward KL: the teacher-weighted gap t − s
            diff = tl.where(mask_v[None, :], teacher - student, 0.0)
            gap = gap * t_rescale + tl.sum(t_exp * diff, axis=1)
        if KIND == 1:   # reverse KL: the student-weighted gap s − t
            diff = tl.where(mask_v[None, :], student - teacher, 0.0)
            gap = gap * s_rescale + tl.sum(s_exp * diff, axis=1)
        if WITH_RAW_LSE:
            raw_or_ninf = tl.where(mask_v[None, :], raw, float("-inf"))
            raw_new = tl.maximum(raw_max, tl.max(raw_or_ninf, axis=1))
            raw_sum = raw_sum * tl.exp(raw_max - raw_new) \
                + tl.sum(tl.exp(raw_or_ninf - raw_new[:, None]), axis=1)
            raw_max = raw_new
        if WITH_LOGPROBS:
            hit = offs_v[None, :] == targets[:, None]
            target_logit += tl.sum(tl.where(hit, raw, 0.0), axis=1)
        s_max = s_new
        t_max = t_new

    out = pid_s * N + offs_n
    tl.store(max_ptr + out, s_max, mask=mask_n)
    tl.store(sum_ptr + out, s_sum, mask=mask_n)
    tl.store(teacher_max_ptr + out, t_max, mask=mask_n)
    tl.store(teacher_sum_ptr + out, t_sum, mask=mask_n)
    if KIND != 2:
        tl.store(gap_ptr + out, gap, mask=mask_n)
    if WITH_RAW_LSE:
        tl.store(raw_max_ptr + out, raw_max, mask=mask_n)
        tl.store(raw_sum_ptr + out, raw_sum, mask=mask_n)
    if WITH_LOGPROBS:
        tl.store(target_ptr + out, target_logit, mask=mask_n)


@triton.jit
def _mixture_stats_kernel(
    hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,
    rows_ptr, lse_ptr, teacher_lse_ptr,                         # [N] each
    q_softplus_ptr, p_softplus_ptr,                             # -> [SPLITS, N] each
    N, V, H, HT, tiles_per_split,
    stride_hm, stride_hh, stride_wv, stride_wh,
    stride_thm, stride_thh, stride_twv, stride_twh,
    inv_temperature, log_ratio,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, TEACHER_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + offs_n, mask=mask_n, other=0.0)
    q_softplus = tl.zeros((BLOCK_N,), dtype=tl.float32)        # S = Σ q σ⁺(d)
    p_softplus = tl.zeros((BLOCK_N,), dtype=tl.float32)        # R = Σ p σ⁺(−d)

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        raw, teacher = _both_tiles(
            hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr,
            teacher_bias_ptr, rows, offs_v, mask_n, mask_v, H, HT,
            stride_hm, stride_hh, stride_wv, stride_wh, stride_thm, stride_thh, stride_twv,
            stride_twh, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_TEACHER_BIAS,
            DOT_FP32, TEACHER_DOT_FP32, DOT_PRECISION)
        log_q = raw * inv_temperature - lse[:, None]
        log_p = teacher - teacher_lse[:, None]
        d = log_p - log_q + log_ratio
        tail = tl.log(1.0 + tl.exp(-tl.abs(d)))
        valid = mask_n[:, None] & mask_v[None, :]
        # where, not a product with a mask: junk rows may overflow exp
        q = tl.where(valid, tl.exp(log_q), 0.0)
        p = tl.where(valid, tl.exp(log_p), 0.0)
        q_softplus += tl.sum(q * tl.where(valid, tl.maximum(d, 0.0) + tail, 0.0), axis=1)
        p_softplus += tl.sum(p * tl.where(valid, tl.maximum(-d, 0.0) + tail, 0.0), axis=1)

    out = pid_s * N + offs_n
    tl.store(q_softplus_ptr + out, q_softplus, mask=mask_n)
    tl.store(p_softplus_ptr + out, p_softplus, mask=mask_n)


@triton.jit
def _divergence_grad_kernel(
    hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,
    rows_ptr, targets_ptr, lse_ptr, teacher_lse_ptr, raw_lse_ptr, aux_ptr,   # [N] each
    grad_divergence_ptr, grad_logprobs_ptr, inv_bound_ptr,      # [N] fp32 each
    grad_chunk_ptr, bias_partials_ptr,                          # -> [N, VC], [TN, VC]
    N, H, HT, v0, chunk_width,
    stride_hm, stride_hh, stride_wv, stride_wh,
    stride_thm, stride_thh, stride_twv, stride_twh,
    inv_temperature, log_ratio, one_minus_beta,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, WITH_LOGPROB_GRAD: tl.constexpr, WITH_RAW_LSE: tl.constexpr,
    NEED_BIAS_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, TEACHER_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N),
                                tl.cdiv(chunk_width, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)           # column within the chunk
    mask_c = offs_c < chunk_width                               # a chunk ends inside V
    offs_v = v0 + offs_c.to(tl.int64)
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_divergence = tl.load(grad_divergence_ptr + offs_n, mask=mask_n, other=0.0)

    raw, teacher = _both_tiles(
        hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr,
        teacher_bias_ptr, rows, offs_v, mask_n, mask_c, H, HT,
        stride_hm, stride_hh, stride_wv, stride_wh, stride_thm, stride_thh, stride_twv,
        stride_twh, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_TEACHER_BIAS,
        DOT_FP32, TEACHER_DOT_FP32, DOT_PRECISION)
    log_q = raw * inv_temperature - lse[:, None]
    log_p = teacher - teacher_lse[:, None]
    q = tl.exp(log_q)
    if KIND == 0:
        slope = q - tl.exp(log_p)
    elif KIND == 1:
        divergence = tl.load(aux_ptr + offs_n, mask=mask_n, other=0.0)
        slope = -q * (log_p - log_q + divergence[:, None])
    else:
        q_softplus = tl.load(aux_ptr + offs_n, mask=mask_n, other=0.0)
        slope = -one_minus_beta * q * (_softplus(log_p - log_q + log_ratio) - q_softplus[:, None])
    grad = slope * (grad_divergence * inv_temperature)[:, None]
    if WITH_LOGPROB_GRAD:
        grad_logprobs = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
        targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
        probs = q
        if WITH_RAW_LSE:
            raw_lse = tl.load(raw_lse_ptr + offs_n, mask=mask_n, other=0.0)
            probs = tl.exp(raw - raw_lse[:, None])
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        grad += grad_logprobs[:, None] * (onehot - probs)
    grad = tl.where(mask_n[:, None] & mask_c[None, :], grad, 0.0)
    stored = grad
    if HAS_ROW_SCALE:  # fp16: rows divided by their bounds (scaling.py) cannot underflow
        stored = grad * tl.load(inv_bound_ptr + offs_n, mask=mask_n, other=1.0)[:, None]
    out = grad_chunk_ptr + offs_n.to(tl.int64)[:, None] * chunk_width + offs_c[None, :]
    tl.store(out, stored.to(grad_chunk_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])
    if NEED_BIAS_GRAD:
        tl.store(bias_partials_ptr + pid_n.to(tl.int64) * chunk_width + offs_c,
                 tl.sum(grad, axis=0), mask=mask_c)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _strides(hidden, weight, teacher_hidden, teacher_weight) -> tuple:
    return (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            teacher_hidden.stride(0), teacher_hidden.stride(1), teacher_weight.stride(0),
            teacher_weight.stride(1))


def _flags(hidden, teacher_hidden, bias, teacher_bias) -> dict:
    dots = _launch.dot_flags(hidden)
    return dict(HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None,
                TEACHER_DOT_FP32=_launch.dot_flags(teacher_hidden)["DOT_FP32"], **dots)


def _merge(split_max: torch.Tensor, split_sum: torch.Tensor):
    """[SPLITS, N] online-lse partials -> (lse [N], each split's weight exp(m_s − m), Σ)."""
    top = split_max.max(dim=0).values
    weights = torch.exp(split_max - top)
    total = (split_sum * weights).sum(0)
    return top + torch.log(total), weights, total


def check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias) -> None:
    _launch.check_inputs(hidden, weight, bias)
    _launch.check_inputs(teacher_hidden, teacher_weight, teacher_bias)


def forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
            *, kind, beta, temperature, with_logprobs, num_splits=None, config=None):
    """Per-token (divergence, logprobs | None, lse, teacher_lse, raw_lse | None, aux | None),
    [N] fp32 each, as ``fused_losses.divergence.torch_chunked.forward``."""
    check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    bias, teacher_bias, rows, targets = _launch.contiguous(bias, teacher_bias, rows, targets)
    num_rows, vocab = rows.numel(), weight.shape[0]
    with_raw_lse = with_logprobs and temperature != 1.0
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if num_rows == 0:
        empty = torch.zeros(0, **f32)
        return (empty, empty if with_logprobs else None, empty, empty,
                empty if with_raw_lse else None, None if kind == "forward_kl" else empty)
    cfg = config or _launch.config("divergence_fwd", hidden)
    token_tiles = triton.cdiv(num_rows, cfg["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = num_splits or _launch.vocab_splits(token_tiles, vocab_tiles, hidden.device)
    tiles_per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split starts inside V
    partial = lambda: torch.empty(splits, num_rows, **f32)  # noqa: E731
    s_max, s_sum, t_max, t_sum = partial(), partial(), partial(), partial()
    gap = partial() if kind != "jsd" else s_sum
    raw_max, raw_sum = (partial(), partial()) if with_raw_lse else (s_sum, s_sum)
    target_logit = partial() if with_logprobs else s_sum
    shapes = (num_rows, vocab, hidden.shape[1], teacher_hidden.shape[1], tiles_per_split)
    strides = _strides(hidden, weight, teacher_hidden, teacher_weight)
    heads = (hidden, weight, bias if bias is not None else weight, teacher_hidden,
             teacher_weight, teacher_bias if teacher_bias is not None else teacher_weight)
    flags = _flags(hidden, teacher_hidden, bias, teacher_bias)
    _divergence_stats_kernel[(token_tiles, splits)](
        *heads, rows, targets, s_max, s_sum, t_max, t_sum, gap, raw_max, raw_sum, target_logit,
        *shapes, *strides, 1.0 / temperature, KIND=KINDS[kind], WITH_LOGPROBS=with_logprobs,
        WITH_RAW_LSE=with_raw_lse, **flags, **cfg)

    lse, s_weights, s_total = _merge(s_max, s_sum)
    teacher_lse, t_weights, t_total = _merge(t_max, t_sum)
    raw_lse = _merge(raw_max, raw_sum)[0] if with_raw_lse else None
    logprobs = None
    if with_logprobs:
        logprobs = target_logit.sum(0) - (lse if raw_lse is None else raw_lse)
    if kind == "forward_kl":
        return ((gap * t_weights).sum(0) / t_total - teacher_lse + lse, logprobs, lse,
                teacher_lse, raw_lse, None)
    if kind == "reverse_kl":
        divergence = (gap * s_weights).sum(0) / s_total - lse + teacher_lse
        return divergence, logprobs, lse, teacher_lse, raw_lse, divergence
    q_softplus, p_softplus = partial(), partial()
    _mixture_stats_kernel[(token_tiles, splits)](
        *heads, rows, lse, teacher_lse, q_softplus, p_softplus, *shapes, *strides,
        1.0 / temperature, math.log(beta) - math.log1p(-beta), **flags, **cfg)
    aux = q_softplus.sum(0)
    entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    divergence = entropy - beta * p_softplus.sum(0) - (1 - beta) * aux
    return divergence, logprobs, lse, teacher_lse, raw_lse, aux


def backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
             stats, grad_divergence, grad_logprobs, *, kind, beta, temperature, with_logprobs,
             need_hidden=True, need_weight=True, need_bias=True, config=None,
             chunk_bytes=None):
    """(dH [M, H], dW [V, H] contiguous, dBias [V]) of the student, in its dtype; None where
    not needed.

    ``stats`` are the forward's outputs (its ``lse``, ``teacher_lse``, ``raw_lse``, ``aux``
    are read); ``grad_divergence`` / ``grad_logprobs`` [N] fp32 or None, of any strides.
    fp16 gradient chunks are row-scaled by ``scaling.divergence_grad_bound``.
    """
    check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    bias, teacher_bias, rows, targets, grad_divergence, grad_logprobs = _launch.contiguous(
        bias, teacher_bias, rows, targets, grad_divergence, grad_logprobs)
    lse, teacher_lse, raw_lse, aux = _launch.contiguous(stats.lse, stats.teacher_lse,
                                                        stats.raw_lse, stats.aux)
    num_rows, vocab, width = rows.numel(), weight.shape[0], weight.shape[1]
    need_bias = need_bias and bias is not None
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    cfg = config or _launch.config("divergence_bwd", hidden)
    meta = {k: cfg[k] for k in ("num_warps", "num_stages")}
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    zeros = torch.zeros(num_rows, **f32)
    row_scale = scaling.needs_row_scale(weight.dtype) and num_rows > 0
    bound = max_bound = ratio = None
    inv_bound = zeros
    if row_scale:
        bound = scaling.divergence_grad_bound(kind, beta, temperature, aux, grad_divergence,
                                              grad_logprobs)
        max_bound = bound.max().reshape(1)  # stays on the device: no host sync
        inv_bound, ratio = 1.0 / bound, bound / max_bound
    per_token = (lse, teacher_lse, zeros if raw_lse is None else raw_lse,
                 zeros if aux is None else aux,
                 zeros if grad_divergence is None else grad_divergence,
                 zeros if grad_logprobs is None else grad_logprobs, inv_bound)
    flags = _flags(hidden, teacher_hidden, bias, teacher_bias)

    grad_hidden_f32 = torch.zeros(num_rows, width, **f32) if need_hidden else None
    # Contiguous whatever weight's strides: the dW kernel writes row-major, every entry once
    # when there are rows to visit.
    grad_weight = None
    if need_weight:
        grad_weight = (torch.empty if num_rows else torch.zeros)(
            vocab, width, dtype=weight.dtype, device=device)
    grad_bias_f32 = torch.zeros(vocab, **f32) if need_bias else None
    columns = configs.chunk_width(num_rows, vocab, weight.element_size(), block_v,
                                  chunk_bytes or _launch.grad_chunk_bytes())
    token_tiles = triton.cdiv(num_rows, block_n)
    grad_chunk = torch.empty(num_rows, columns, dtype=weight.dtype, device=device)
    bias_partials = torch.empty(token_tiles, columns, **f32) if need_bias else zeros
    heads = (hidden, weight, bias if bias is not None else weight, teacher_hidden,
             teacher_weight, teacher_bias if teacher_bias is not None else teacher_weight)
    strides = _strides(hidden, weight, teacher_hidden, teacher_weight)
    log_ratio = math.log(beta) - math.log1p(-beta) if kind == "jsd" else 0.0
    for v0 in range(0, vocab if num_rows else 0, columns):
        width_here = min(columns, vocab - v0)
        vocab_tiles = triton.cdiv(width_here, block_v)
        _divergence_grad_kernel[(token_tiles * vocab_tiles,)](
            *heads, rows, targets, *per_token, grad_chunk, bias_partials,
            num_rows, width, teacher_hidden.shape[1], v0, width_here, *strides,
            1.0 / temperature, log_ratio, 1.0 - beta,
            KIND=KINDS[kind], BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"],
            GROUP_N=cfg["GROUP_N"], HAS_ROW_SCALE=row_scale,
            WITH_LOGPROB_GRAD=grad_logprobs is not None, WITH_RAW_LSE=raw_lse is not None,
            NEED_BIAS_GRAD=need_bias, **flags, **meta)
        # the kernel lays a chunk out with row stride width_here, not columns
        chunk = grad_chunk.view(-1)[:num_rows * width_here].view(num_rows, width_here)
        if need_hidden:  # grad_chunk stands in for the keep flags: never read unfiltered
            grad_hidden_gemm(chunk, weight, v0, grad_hidden_f32, grad_chunk, cfg,
                             filtered=False)
        if need_weight:
            grad_weight_gemm(chunk, hidden, rows, v0, grad_weight, grad_chunk, ratio,
                             max_bound, cfg, filtered=False, accumulate=False)
        if need_bias:
            partials = bias_partials.view(-1)[:token_tiles * width_here]
            torch.sum(partials.view(token_tiles, width_here), dim=0,
                      out=grad_bias_f32[v0:v0 + width_here])
    del grad_chunk, bias_partials
    grad_hidden = None
    if need_hidden:
        if row_scale:
            grad_hidden_f32.mul_(bound.unsqueeze(1))
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows,
                                                           grad_hidden_f32.to(hidden.dtype))
    grad_bias = grad_bias_f32.to(bias.dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias
