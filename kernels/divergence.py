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

The per-tile math (``_pair_update``, ``_mixture_update``, ``_grad_tile``) is written once here
as ``@triton.jit`` helpers; the epilogues of the cuBLAS implementation
(``divergence_epilogue.py``) apply them to GEMM-formed chunks, and the host merge
(:func:`pair_statistics`, :func:`mixture_statistics`) serves both.

Non-finite logits (``fused_losses.divergence``, the contract of ``fused_losses.backends``):
a ``-inf`` logit (a vocabulary mask) has probability 0 and adds 0·log 0 = 0 to every sum
and 0 to the gradient (``_weighted_sum``; ``where``, never a product, so 0·inf is not NaN);
a KL whose first model has mass where the other's logit is ``-inf`` is +inf. A NaN or
``+inf`` logit, or a row of ``-inf``, makes its lse, divergence and gradient row NaN.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch, configs, scaling
from ._tl_helpers import grouped_tile, logits_tile
from .logprobs_bwd import grad_buffers, grad_hidden_gemm, grad_weight_gemm, packed

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
    it rounds to 0, so no log1p is needed. ±inf give inf and 0."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _online_lse(x, running_max, running_sum):
    """Merge a tile ``x`` [BLOCK_N, BLOCK_V] (``-inf`` where masked or a vocabulary mask)
    into its rows' online log-sum-exp: returns (new max, the old sums' rescale,
    ``exp(x − new max)`` (0 at ``-inf``), new sum). While a row has seen only ``-inf`` the
    exponent is taken against 0, never ``-inf − -inf``; a NaN or ``+inf`` entry makes the
    sum NaN whatever a GPU's max does with NaN (``exp(NaN − m)``, ``exp(inf − inf)``)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    exps = tl.exp(x - shift[:, None])
    return new_max, rescale, exps, running_sum * rescale + tl.sum(exps, axis=1)


@triton.jit
def _weighted_sum(weights, values):
    """Σ_v weights·values per row with 0·log 0 = 0: a zero weight (probability 0: a masked
    logit, or one that underflows) contributes 0 even where ``values`` is ±inf or NaN."""
    return tl.sum(tl.where(weights == 0.0, 0.0, weights * values), axis=1)


@triton.jit
def _rescaled(running, rescale):
    """A running weighted sum after its max moved; 0, not inf·0, where every earlier weight
    underflows (the earlier columns' probabilities are 0 at fp32 against the new max)."""
    return tl.where(rescale == 0.0, 0.0, running * rescale)


@triton.jit
def _pair_update(
    raw, teacher, mask_v, offs_v, targets, inv_temperature,  # raw z and t = z_T/τ tiles
    s_max, s_sum, t_max, t_sum, gap, raw_max, raw_sum, target_logit,  # [BLOCK_N] each
    KIND: tl.constexpr, WITH_RAW_LSE: tl.constexpr, WITH_LOGPROBS: tl.constexpr,
):
    """Merge one pair of tiles (vocabulary ids ``offs_v``) into the rows' statistics (the
    module docstring's step 1): the online lse of s = z/τ and of t, the divergence's running
    sum ``gap`` (KIND 0, 1), the online lse of z (WITH_RAW_LSE) and the target's raw logit
    (WITH_LOGPROBS). Returns them updated, in the order given."""
    student = raw * inv_temperature
    s_max, s_rescale, s_exp, s_sum = _online_lse(
        tl.where(mask_v[None, :], student, float("-inf")), s_max, s_sum)
    t_max, t_rescale, t_exp, t_sum = _online_lse(
        tl.where(mask_v[None, :], teacher, float("-inf")), t_max, t_sum)
    if KIND == 0:   # forward KL: the teacher-weighted gap t − s
        gap = _rescaled(gap, t_rescale) + _weighted_sum(t_exp, teacher - student)
    if KIND == 1:   # reverse KL: the student-weighted gap s − t
        gap = _rescaled(gap, s_rescale) + _weighted_sum(s_exp, student - teacher)
    if WITH_RAW_LSE:
        raw_max, _, _, raw_sum = _online_lse(tl.where(mask_v[None, :], raw, float("-inf")),
                                             raw_max, raw_sum)
    if WITH_LOGPROBS:
        hit = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(hit, raw, 0.0), axis=1)
    return s_max, s_sum, t_max, t_sum, gap, raw_max, raw_sum, target_logit


@triton.jit
def _mixture_update(raw, teacher, valid, lse, teacher_lse, inv_temperature, log_ratio,
                    q_softplus, p_softplus):
    """JSD's second pass over one pair of tiles, lse_s and lse_t known: adds
    ``Σ q σ⁺(d)`` to ``q_softplus`` (S) and ``Σ p σ⁺(−d)`` to ``p_softplus`` (R).
    ``valid`` [BLOCK_N, BLOCK_V] masks the tiles' edges. Probability-0 columns add 0."""
    log_q = raw * inv_temperature - lse[:, None]
    log_p = teacher - teacher_lse[:, None]
    d = log_p - log_q + log_ratio
    # where, not a product with a mask: junk rows may overflow exp
    q = tl.where(valid, tl.exp(log_q), 0.0)
    p = tl.where(valid, tl.exp(log_p), 0.0)
    tail = tl.log(1.0 + tl.exp(-tl.abs(d)))
    q_softplus += _weighted_sum(q, tl.maximum(d, 0.0) + tail)
    p_softplus += _weighted_sum(p, tl.maximum(-d, 0.0) + tail)
    return q_softplus, p_softplus


@triton.jit
def _grad_tile(
    raw, teacher, offs_v, valid, targets,                    # tiles; [BLOCK_N] int64
    lse, teacher_lse, raw_lse, aux, grad_divergence, grad_logprobs,  # [BLOCK_N] fp32 each
    inv_temperature, log_ratio, one_minus_beta,
    KIND: tl.constexpr, WITH_DIVERGENCE_GRAD: tl.constexpr, WITH_LOGPROB_GRAD: tl.constexpr,
    WITH_RAW_LSE: tl.constexpr,
):
    """dL/dz of one tile, fp32, 0 outside ``valid`` (the module docstring's backward):
    ``g_D/τ · dD/ds + g_lp (onehot(y) − softmax(z))``, each term only with its flag (an
    absent upstream gradient adds nothing, even to an infinite divergence's row). A masked
    student logit (q = 0) gets 0, not 0·inf; a NaN ``g_D`` (the dispatcher's mark of an
    infinite divergence) or statistic makes the row NaN."""
    log_q = raw * inv_temperature - lse[:, None]
    q = tl.exp(log_q)
    grad = tl.zeros_like(q)
    if WITH_DIVERGENCE_GRAD:
        log_p = teacher - teacher_lse[:, None]
        if KIND == 0:
            slope = q - tl.exp(log_p)
        elif KIND == 1:
            slope = tl.where(q == 0.0, 0.0, -q * (log_p - log_q + aux[:, None]))
        else:
            slope = tl.where(q == 0.0, 0.0,
                             -one_minus_beta * q * (_softplus(log_p - log_q + log_ratio)
                                                    - aux[:, None]))
        grad = slope * (grad_divergence * inv_temperature)[:, None]
    if WITH_LOGPROB_GRAD:
        probs = q
        if WITH_RAW_LSE:
            probs = tl.exp(raw - raw_lse[:, None])
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        grad += grad_logprobs[:, None] * (onehot - probs)
    return tl.where(valid, grad, 0.0)


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
        s_max, s_sum, t_max, t_sum, gap, raw_max, raw_sum, target_logit = _pair_update(
            raw, teacher, mask_v, offs_v, targets, inv_temperature, s_max, s_sum, t_max,
            t_sum, gap, raw_max, raw_sum, target_logit, KIND, WITH_RAW_LSE, WITH_LOGPROBS)

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
        q_softplus, p_softplus = _mixture_update(
            raw, teacher, mask_n[:, None] & mask_v[None, :], lse, teacher_lse,
            inv_temperature, log_ratio, q_softplus, p_softplus)

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
    HAS_ROW_SCALE: tl.constexpr, WITH_DIVERGENCE_GRAD: tl.constexpr,
    WITH_LOGPROB_GRAD: tl.constexpr, WITH_RAW_LSE: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr,
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
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + offs_n, mask=mask_n, other=0.0)
    raw_lse = tl.load(raw_lse_ptr + offs_n, mask=mask_n, other=0.0)
    aux = tl.load(aux_ptr + offs_n, mask=mask_n, other=0.0)
    grad_divergence = tl.load(grad_divergence_ptr + offs_n, mask=mask_n, other=0.0)
    grad_logprobs = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)

    raw, teacher = _both_tiles(
        hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr,
        teacher_bias_ptr, rows, offs_v, mask_n, mask_c, H, HT,
        stride_hm, stride_hh, stride_wv, stride_wh, stride_thm, stride_thh, stride_twv,
        stride_twh, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_TEACHER_BIAS,
        DOT_FP32, TEACHER_DOT_FP32, DOT_PRECISION)
    valid = mask_n[:, None] & mask_c[None, :]
    grad = _grad_tile(raw, teacher, offs_v, valid, targets, lse, teacher_lse, raw_lse, aux,
                      grad_divergence, grad_logprobs, inv_temperature, log_ratio,
                      one_minus_beta, KIND, WITH_DIVERGENCE_GRAD, WITH_LOGPROB_GRAD,
                      WITH_RAW_LSE)
    stored = grad
    if HAS_ROW_SCALE:  # fp16: rows divided by their bounds (scaling.py) cannot underflow
        stored = grad * tl.load(inv_bound_ptr + offs_n, mask=mask_n, other=1.0)[:, None]
    out = grad_chunk_ptr + offs_n.to(tl.int64)[:, None] * chunk_width + offs_c[None, :]
    tl.store(out, stored.to(grad_chunk_ptr.dtype.element_ty), mask=valid)
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


class PairState(NamedTuple):
    """Partial statistics of both models per (slot, token), ``[SPLITS, N]`` fp32 each, as the
    statistics kernels keep them: online lse of s and of t, the divergence's running sum
    (``gap``, the KL kinds), the online lse of z (``raw_*``, τ ≠ 1 with log-probs) and the
    target's raw logit (with log-probs); None where not kept."""

    s_max: torch.Tensor
    s_sum: torch.Tensor
    t_max: torch.Tensor
    t_sum: torch.Tensor
    gap: torch.Tensor | None
    raw_max: torch.Tensor | None
    raw_sum: torch.Tensor | None
    target: torch.Tensor | None


def pair_state(splits: int, rows: int, device, *, kind: str, with_logprobs: bool,
               with_raw_lse: bool) -> PairState:
    """The empty state (maxes -inf, sums 0: the merge's neutral elements)."""
    f32 = dict(dtype=torch.float32, device=device)

    def maxes():
        return torch.full((splits, rows), float("-inf"), **f32)

    def sums():
        return torch.zeros(splits, rows, **f32)

    return PairState(maxes(), sums(), maxes(), sums(), sums() if kind != "jsd" else None,
                     maxes() if with_raw_lse else None, sums() if with_raw_lse else None,
                     sums() if with_logprobs else None)


def state_pointers(state: PairState) -> tuple:
    """The eight state tensors for a kernel launch; one the kernel never touches where a
    statistic is not kept (its flag is off)."""
    return tuple(state.s_sum if t is None else t for t in state)


def _merge(split_max: torch.Tensor, split_sum: torch.Tensor):
    """[SPLITS, N] online-lse partials -> (lse [N], each split's weight exp(m_s − m), Σ).
    A row whose logits are all -inf has a NaN lse (weights exp(-inf − -inf)), as a NaN or
    +inf logit gives (``fused_losses.backends``)."""
    top = split_max.max(dim=0).values
    weights = torch.exp(split_max - top)
    total = (split_sum * weights).sum(0)
    return top + torch.log(total), weights, total


def _nan_rows(divergence: torch.Tensor, lse: torch.Tensor, teacher_lse: torch.Tensor):
    """NaN wherever either model's lse is (a row with a NaN or +inf logit, or only -inf)."""
    return torch.where(lse.isnan() | teacher_lse.isnan(), float("nan"), divergence)


def pair_statistics(kind: str, state: PairState):
    """Merge the slots: ``forward``'s six outputs (divergence, logprobs | None, lse,
    teacher_lse, raw_lse | None, aux | None), [N] each; for JSD the divergence and ``aux``
    are None until its second pass (:func:`mixture_statistics`)."""
    lse, s_weights, s_total = _merge(state.s_max, state.s_sum)
    teacher_lse, t_weights, t_total = _merge(state.t_max, state.t_sum)
    raw_lse = None if state.raw_max is None else _merge(state.raw_max, state.raw_sum)[0]
    logprobs = None
    if state.target is not None:
        logprobs = state.target.sum(0) - (lse if raw_lse is None else raw_lse)
    divergence = None
    if kind == "forward_kl":
        divergence = (state.gap * t_weights).sum(0) / t_total - teacher_lse + lse
    elif kind == "reverse_kl":
        divergence = (state.gap * s_weights).sum(0) / s_total - lse + teacher_lse
    if divergence is not None:
        divergence = _nan_rows(divergence, lse, teacher_lse)
    aux = divergence if kind == "reverse_kl" else None
    return divergence, logprobs, lse, teacher_lse, raw_lse, aux


def mixture_statistics(beta: float, q_softplus: torch.Tensor, p_softplus: torch.Tensor,
                       stats: tuple) -> tuple:
    """JSD's ``stats`` (:func:`pair_statistics`) completed from the second pass's
    [SPLITS, N] sums: D and ``aux`` = S."""
    aux = q_softplus.sum(0)
    entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    divergence = _nan_rows(entropy - beta * p_softplus.sum(0) - (1 - beta) * aux, stats[2],
                           stats[3])
    return (divergence, *stats[1:5], aux)


def mixture_shift(kind: str, beta: float) -> float:
    """JSD's shift ``log(β/(1−β))`` of d (0 for the KL kinds, which do not read it)."""
    return math.log(beta) - math.log1p(-beta) if kind == "jsd" else 0.0


def check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias) -> None:
    _launch.check_inputs(hidden, weight, bias)
    _launch.check_inputs(teacher_hidden, teacher_weight, teacher_bias)


def empty_statistics(kind: str, with_logprobs: bool, with_raw_lse: bool, device) -> tuple:
    """The six outputs of ``forward`` for no scored row."""
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    return (empty, empty if with_logprobs else None, empty, empty,
            empty if with_raw_lse else None, None if kind == "forward_kl" else empty)


def forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
            *, kind, beta, temperature, with_logprobs, num_splits=None, config=None):
    """Per-token (divergence, logprobs | None, lse, teacher_lse, raw_lse | None, aux | None),
    [N] fp32 each, as ``fused_losses.divergence.torch_chunked.forward``."""
    check(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    bias, teacher_bias, rows, targets = _launch.contiguous(bias, teacher_bias, rows, targets)
    num_rows, vocab = rows.numel(), weight.shape[0]
    with_raw_lse = with_logprobs and temperature != 1.0
    if num_rows == 0:
        return empty_statistics(kind, with_logprobs, with_raw_lse, hidden.device)
    cfg = config or _launch.config("divergence_fwd", hidden)
    token_tiles = triton.cdiv(num_rows, cfg["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = num_splits or _launch.vocab_splits(token_tiles, vocab_tiles, hidden.device)
    tiles_per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split starts inside V
    state = pair_state(splits, num_rows, hidden.device, kind=kind, with_logprobs=with_logprobs,
                       with_raw_lse=with_raw_lse)
    shapes = (num_rows, vocab, hidden.shape[1], teacher_hidden.shape[1], tiles_per_split)
    strides = _strides(hidden, weight, teacher_hidden, teacher_weight)
    heads = (hidden, weight, bias if bias is not None else weight, teacher_hidden,
             teacher_weight, teacher_bias if teacher_bias is not None else teacher_weight)
    flags = _flags(hidden, teacher_hidden, bias, teacher_bias)
    _divergence_stats_kernel[(token_tiles, splits)](
        *heads, rows, targets, *state_pointers(state), *shapes, *strides, 1.0 / temperature,
        KIND=KINDS[kind], WITH_LOGPROBS=with_logprobs, WITH_RAW_LSE=with_raw_lse, **flags,
        **cfg)
    stats = pair_statistics(kind, state)
    if kind != "jsd":
        return stats
    q_softplus, p_softplus = (torch.zeros(splits, num_rows, dtype=torch.float32,
                                          device=hidden.device) for _ in range(2))
    _mixture_stats_kernel[(token_tiles, splits)](
        *heads, rows, stats[2], stats[3], q_softplus, p_softplus, *shapes, *strides,
        1.0 / temperature, mixture_shift(kind, beta), **flags, **cfg)
    return mixture_statistics(beta, q_softplus, p_softplus, stats)


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

    grad_hidden_f32, grad_weight, grad_bias_f32, grad_chunk, bias_partials, columns, \
        token_tiles = grad_buffers(num_rows, weight, block_n, block_v, chunk_bytes,
                                   need_hidden, need_weight, need_bias, zeros)
    heads = (hidden, weight, bias if bias is not None else weight, teacher_hidden,
             teacher_weight, teacher_bias if teacher_bias is not None else teacher_weight)
    strides = _strides(hidden, weight, teacher_hidden, teacher_weight)
    for v0 in range(0, vocab if num_rows else 0, columns):
        width_here = min(columns, vocab - v0)
        vocab_tiles = triton.cdiv(width_here, block_v)
        _divergence_grad_kernel[(token_tiles * vocab_tiles,)](
            *heads, rows, targets, *per_token, grad_chunk, bias_partials,
            num_rows, width, teacher_hidden.shape[1], v0, width_here, *strides,
            1.0 / temperature, mixture_shift(kind, beta), 1.0 - beta,
            KIND=KINDS[kind], BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"],
            GROUP_N=cfg["GROUP_N"], HAS_ROW_SCALE=row_scale,
            WITH_DIVERGENCE_GRAD=grad_divergence is not None,
            WITH_LOGPROB_GRAD=grad_logprobs is not None, WITH_RAW_LSE=raw_lse is not None,
            NEED_BIAS_GRAD=need_bias, **flags, **meta)
        # grad_chunk stands in for the keep flags: never read unfiltered
        if need_hidden:
            grad_hidden_gemm(packed(grad_chunk, num_rows, width_here), weight, v0,
                             grad_hidden_f32, grad_chunk, cfg, filtered=False)
        if need_weight:
            grad_weight_gemm(packed(grad_chunk, num_rows, width_here), hidden, rows, v0,
                             grad_weight, grad_chunk, ratio, max_bound, cfg, filtered=False,
                             accumulate=False)
        if need_bias:
            torch.sum(packed(bias_partials, token_tiles, width_here), dim=0,
                      out=grad_bias_f32[v0:v0 + width_here])
    # As the log-prob backward: no view of the chunk buffers outlives the loop, and the fp32
    # dH goes once cast, before the scatter's zeros_like.
    del grad_chunk, bias_partials
    grad_hidden = None
    if need_hidden:
        if row_scale:
            grad_hidden_f32.mul_(bound.unsqueeze(1))
        grad_hidden = grad_hidden_f32.to(hidden.dtype)
        del grad_hidden_f32
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_hidden)
    grad_bias = grad_bias_f32.to(bias.dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias
