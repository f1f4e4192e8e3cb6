"""Epilogues of GEMM-formed chunks of both heads: the distillation primitive's cuBLAS path.

``fused_losses/divergence/cublas_epilogue.py`` forms a chunk of raw products per head with a
library GEMM: ``product = hidden[rows] @ weight[v0:v0 + C].T`` (the student's) and
``teacher_product = teacher_hidden[rows] @ teacher_weight[v0:v0 + C].T``, ``[R, C]`` fp32 each
(row strides ``stride_pr`` and ``stride_tr``, vocabulary ids ``v0 ..``), and hands the pair to
these kernels. They apply each head's bias and ``1/τ`` on the fly (``epilogue._chunk_logits``)
and the per-tile math of ``divergence.py`` (its module docstring has the formulas), so the
fused kernels and these epilogues compute the same thing by the same code.

* ``_pair_fold_kernel``, grid ``(cdiv(R, BLOCK_N), SPLITS)``: program (i, s) owns token tile i
  and the s-th contiguous column range of the chunk, and continues slot s of a
  ``divergence.PairState`` (``[SPLITS, R]``: both models' online lse, the KL kinds' running
  sum, the lse of z and the target logit), so a row's state accumulates over vocabulary
  chunks folded in increasing order; ``divergence.pair_statistics`` merges the slots.
* ``_mixture_fold_kernel`` (JSD's second pass), same grid: with lse_s and lse_t known, adds
  ``Σ q σ⁺(d)`` and ``Σ p σ⁺(−d)`` of its columns to ``[SPLITS, R]`` sums.
* ``_pair_grad_kernel``, same grid: the student's logit gradient
  ``g_D/τ · dD/ds + g_lp (onehot(y) − softmax(z))`` in the GEMM operand dtype into ``grad``
  (row stride ``stride_gr``), which may alias the student's product: a 16-bit gradient over
  the first half of each fp32 row, or an fp32 one over the same elements. Then SPLITS is 1:
  a program walks its rows' columns in increasing order, and a barrier per tile makes every
  store land on bytes all of its warps have read.

No atomics: every program owns the state or gradient entries it writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch, configs, epilogue
from .divergence import KINDS, PairState, _grad_tile, _mixture_update, _pair_update, mixture_shift
from .epilogue import _chunk_logits, _or


@triton.jit
def _chunk_pair(product_ptr, teacher_product_ptr, bias_ptr, teacher_bias_ptr, offs_n, offs_c,
                offs_v, mask_n, mask_c, stride_pr, stride_tr, inv_temperature,
                HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr):
    """(raw student logits z, teacher logits / τ), [BLOCK_N, BLOCK_V] fp32 each; masked
    entries hold finite junk (callers mask)."""
    raw = _chunk_logits(product_ptr, bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c,
                        stride_pr, 1.0, 1.0, HAS_BIAS, False)
    teacher = _chunk_logits(teacher_product_ptr, teacher_bias_ptr, offs_n, offs_c, offs_v,
                            mask_n, mask_c, stride_tr, inv_temperature, 1.0, HAS_TEACHER_BIAS,
                            False)
    return raw, teacher


@triton.jit
def _pair_fold_kernel(
    product_ptr, teacher_product_ptr, bias_ptr, teacher_bias_ptr,  # [R, C] x2, [V] x2
    targets_ptr,                                                   # [R]
    max_ptr, sum_ptr, teacher_max_ptr, teacher_sum_ptr,            # state [SPLITS, R] each
    gap_ptr, raw_max_ptr, raw_sum_ptr, target_ptr,                 # state [SPLITS, R] each
    R, C, v0, cols_per_split, stride_pr, stride_tr,
    inv_temperature,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    WITH_LOGPROBS: tl.constexpr, WITH_RAW_LSE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < R
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    slot = pid_s.to(tl.int64) * R + offs_n
    s_max = tl.load(max_ptr + slot, mask=mask_n, other=float("-inf"))
    s_sum = tl.load(sum_ptr + slot, mask=mask_n, other=0.0)
    t_max = tl.load(teacher_max_ptr + slot, mask=mask_n, other=float("-inf"))
    t_sum = tl.load(teacher_sum_ptr + slot, mask=mask_n, other=0.0)
    gap = s_sum            # the KL kinds' running sum (KIND 0, 1)
    raw_max = s_max        # online lse of z (WITH_RAW_LSE)
    raw_sum = s_sum
    target_logit = s_sum   # the target's raw logit (WITH_LOGPROBS)
    if KIND != 2:
        gap = tl.load(gap_ptr + slot, mask=mask_n, other=0.0)
    if WITH_RAW_LSE:
        raw_max = tl.load(raw_max_ptr + slot, mask=mask_n, other=float("-inf"))
        raw_sum = tl.load(raw_sum_ptr + slot, mask=mask_n, other=0.0)
    if WITH_LOGPROBS:
        target_logit = tl.load(target_ptr + slot, mask=mask_n, other=0.0)

    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c_start in range(c_begin, c_end, BLOCK_V):
        offs_c = c_start + tl.arange(0, BLOCK_V)
        mask_c = offs_c < c_end
        offs_v = v0 + offs_c.to(tl.int64)
        raw, teacher = _chunk_pair(product_ptr, teacher_product_ptr, bias_ptr,
                                   teacher_bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c,
                                   stride_pr, stride_tr, inv_temperature, HAS_BIAS,
                                   HAS_TEACHER_BIAS)
        s_max, s_sum, t_max, t_sum, gap, raw_max, raw_sum, target_logit = _pair_update(
            raw, teacher, mask_c, offs_v, targets, inv_temperature, s_max, s_sum, t_max,
            t_sum, gap, raw_max, raw_sum, target_logit, KIND, WITH_RAW_LSE, WITH_LOGPROBS)

    tl.store(max_ptr + slot, s_max, mask=mask_n)
    tl.store(sum_ptr + slot, s_sum, mask=mask_n)
    tl.store(teacher_max_ptr + slot, t_max, mask=mask_n)
    tl.store(teacher_sum_ptr + slot, t_sum, mask=mask_n)
    if KIND != 2:
        tl.store(gap_ptr + slot, gap, mask=mask_n)
    if WITH_RAW_LSE:
        tl.store(raw_max_ptr + slot, raw_max, mask=mask_n)
        tl.store(raw_sum_ptr + slot, raw_sum, mask=mask_n)
    if WITH_LOGPROBS:
        tl.store(target_ptr + slot, target_logit, mask=mask_n)


@triton.jit
def _mixture_fold_kernel(
    product_ptr, teacher_product_ptr, bias_ptr, teacher_bias_ptr,  # [R, C] x2, [V] x2
    lse_ptr, teacher_lse_ptr,                                      # [R] each
    q_softplus_ptr, p_softplus_ptr,                                # sums [SPLITS, R] each
    R, C, v0, cols_per_split, stride_pr, stride_tr,
    inv_temperature, log_ratio,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < R
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + offs_n, mask=mask_n, other=0.0)
    slot = pid_s.to(tl.int64) * R + offs_n
    q_softplus = tl.load(q_softplus_ptr + slot, mask=mask_n, other=0.0)    # S
    p_softplus = tl.load(p_softplus_ptr + slot, mask=mask_n, other=0.0)    # R

    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c_start in range(c_begin, c_end, BLOCK_V):
        offs_c = c_start + tl.arange(0, BLOCK_V)
        mask_c = offs_c < c_end
        # the biases from v0 on, indexed by column: no int64 vocabulary ids held in the loop
        raw, teacher = _chunk_pair(product_ptr, teacher_product_ptr, bias_ptr + v0,
                                   teacher_bias_ptr + v0, offs_n, offs_c, offs_c, mask_n,
                                   mask_c, stride_pr, stride_tr, inv_temperature, HAS_BIAS,
                                   HAS_TEACHER_BIAS)
        q_softplus, p_softplus = _mixture_update(
            raw, teacher, mask_n[:, None] & mask_c[None, :], lse, teacher_lse,
            inv_temperature, log_ratio, q_softplus, p_softplus)

    tl.store(q_softplus_ptr + slot, q_softplus, mask=mask_n)
    tl.store(p_softplus_ptr + slot, p_softplus, mask=mask_n)


@triton.jit
def _pair_grad_kernel(
    product_ptr, teacher_product_ptr, bias_ptr, teacher_bias_ptr,  # [R, C] x2, [V] x2
    targets_ptr, lse_ptr, teacher_lse_ptr, raw_lse_ptr, aux_ptr,   # [R] each
    grad_divergence_ptr, grad_logprobs_ptr, inv_bound_ptr,         # [R] fp32 each
    grad_ptr,                                                      # -> [R, C], may alias
    R, C, v0, cols_per_split, stride_pr, stride_tr, stride_gr,
    inv_temperature, log_ratio, one_minus_beta,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WITH_DIVERGENCE_GRAD: tl.constexpr, WITH_LOGPROB_GRAD: tl.constexpr,
    WITH_RAW_LSE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < R
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + offs_n, mask=mask_n, other=0.0)
    raw_lse = tl.load(raw_lse_ptr + offs_n, mask=mask_n, other=0.0)
    aux = tl.load(aux_ptr + offs_n, mask=mask_n, other=0.0)
    grad_divergence = tl.load(grad_divergence_ptr + offs_n, mask=mask_n, other=0.0)
    grad_logprobs = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
    row_scale = lse
    if HAS_ROW_SCALE:  # fp16: each row stored divided by its bound (scaling.py)
        row_scale = tl.load(inv_bound_ptr + offs_n, mask=mask_n, other=1.0)
    rows_out = grad_ptr + offs_n.to(tl.int64)[:, None] * stride_gr

    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c_start in range(c_begin, c_end, BLOCK_V):
        offs_c = c_start + tl.arange(0, BLOCK_V)
        mask_c = offs_c < c_end
        offs_v = v0 + offs_c.to(tl.int64)
        raw, teacher = _chunk_pair(product_ptr, teacher_product_ptr, bias_ptr,
                                   teacher_bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c,
                                   stride_pr, stride_tr, inv_temperature, HAS_BIAS,
                                   HAS_TEACHER_BIAS)
        valid = mask_n[:, None] & mask_c[None, :]
        grad = _grad_tile(raw, teacher, offs_v, valid, targets, lse, teacher_lse, raw_lse,
                          aux, grad_divergence, grad_logprobs, inv_temperature, log_ratio,
                          one_minus_beta, KIND, WITH_DIVERGENCE_GRAD, WITH_LOGPROB_GRAD,
                          WITH_RAW_LSE)
        if HAS_ROW_SCALE:
            grad = grad * row_scale[:, None]
        # In place, the 16-bit gradient of tile k lands on the fp32 columns of tile k // 2,
        # which another warp of this program may not have read yet if it lags (the 4- and
        # 1-row tiles spread a row over 4 and 8 warps): every warp has read tile k here.
        tl.debug_barrier()
        tl.store(rows_out + offs_c[None, :], grad.to(grad_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _check_pair(product, teacher_product, rows):
    for name, t in (("product", product), ("teacher product", teacher_product)):
        if t.shape != product.shape or t.stride(1) != 1:
            raise ValueError(f"{name} chunk {tuple(t.shape)} strides {t.stride()}: expected "
                             f"{tuple(product.shape)} with inner stride 1")
    if product.shape[0] != rows:
        raise ValueError(f"product chunk {tuple(product.shape)}: expected {rows} rows")


def fold_splits(rows: int, cols: int, device) -> int:
    """Column splits for a chunk so that the fold's grid fills the device about four times."""
    return epilogue.fold_splits(rows, cols, device, configs.DIVERGENCE_EPILOGUE_TILES)


def _grid(rows: int, cols: int, splits: int, device):
    """(grid, config, columns per split) for a chunk of ``rows`` x ``cols``."""
    cfg = epilogue._config(rows, device, configs.DIVERGENCE_EPILOGUE_TILES)
    per_split = triton.cdiv(triton.cdiv(cols, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    return (triton.cdiv(rows, cfg["BLOCK_N"]), splits), cfg, per_split


def fold(product: torch.Tensor, teacher_product: torch.Tensor, v0: int, bias, teacher_bias,
         targets: torch.Tensor, state: PairState, *, kind: str,
         temperature: float = 1.0) -> None:
    """Continue ``state`` with a chunk pair ([R, C] raw products of vocabulary ids
    ``[v0, v0 + C)``, inner stride 1); chunks must come in increasing ``v0``."""
    rows, cols = product.shape
    if rows == 0 or cols == 0:
        return
    _check_pair(product, teacher_product, state.s_max.shape[1])
    grid, cfg, per_split = _grid(rows, cols, state.s_max.shape[0], product.device)
    _pair_fold_kernel[grid](
        product, teacher_product, _or(bias, product), _or(teacher_bias, product), targets,
        *(_or(t, state.s_sum) for t in state), rows, cols, v0, per_split, product.stride(0),
        teacher_product.stride(0), 1.0 / temperature, KIND=KINDS[kind],
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None,
        WITH_LOGPROBS=state.target is not None, WITH_RAW_LSE=state.raw_max is not None, **cfg)


def mixture_fold(product: torch.Tensor, teacher_product: torch.Tensor, v0: int, bias,
                 teacher_bias, lse: torch.Tensor, teacher_lse: torch.Tensor,
                 sums: tuple[torch.Tensor, torch.Tensor], *, beta: float,
                 temperature: float = 1.0) -> None:
    """JSD's second pass over a chunk pair: add its columns' ``Σ q σ⁺(d)`` and
    ``Σ p σ⁺(−d)`` to ``sums`` ([SPLITS, R] fp32 each, zero at first); ``lse``,
    ``teacher_lse`` [R] contiguous."""
    rows, cols = product.shape
    if rows == 0 or cols == 0:
        return
    _check_pair(product, teacher_product, lse.shape[0])
    grid, cfg, per_split = _grid(rows, cols, sums[0].shape[0], product.device)
    _mixture_fold_kernel[grid](
        product, teacher_product, _or(bias, product), _or(teacher_bias, product), lse,
        teacher_lse, *sums, rows, cols, v0, per_split, product.stride(0),
        teacher_product.stride(0), 1.0 / temperature, mixture_shift("jsd", beta),
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None, **cfg)


def grad(product: torch.Tensor, out: torch.Tensor, teacher_product: torch.Tensor, v0: int,
         bias, teacher_bias, targets: torch.Tensor, lse, teacher_lse, raw_lse, aux,
         grad_divergence, grad_logprobs, *, kind: str, beta: float, temperature: float = 1.0,
         inv_bound: torch.Tensor | None = None) -> None:
    """Write the student's logit gradient of the chunk pair into ``out`` [R, C].

    ``out`` may share ``product``'s storage with the same row start in bytes (an fp32 gradient
    over the same elements, or a 16-bit one over the first half of each row). Per-token
    tensors are [R] fp32, any strides; ``raw_lse``, ``aux`` and the ``grad_*`` may be None
    (not needed by ``kind``, no such term). ``inv_bound`` ([R], fp16 chunks) multiplies each
    row before it is stored (``scaling.py``)."""
    rows, cols = product.shape
    if rows == 0 or cols == 0:
        return
    _check_pair(product, teacher_product, targets.shape[0])
    if out.shape != product.shape or out.stride(1) != 1:
        raise ValueError(f"gradient chunk {tuple(out.shape)} strides {out.stride()}: expected "
                         f"{tuple(product.shape)} with inner stride 1")
    in_place = out.untyped_storage().data_ptr() == product.untyped_storage().data_ptr()
    # In place, a program must own whole rows (see the module docstring): one split.
    splits = 1 if in_place else fold_splits(rows, cols, product.device)
    grid, cfg, per_split = _grid(rows, cols, splits, product.device)
    zeros = torch.zeros(rows, dtype=torch.float32, device=product.device)
    # indexed as ptr + offs: an expanded (stride-0) upstream gradient gets a contiguous copy
    per_token = _launch.contiguous(lse, teacher_lse, raw_lse, aux, grad_divergence,
                                   grad_logprobs, inv_bound)
    _pair_grad_kernel[grid](
        product, teacher_product, _or(bias, product), _or(teacher_bias, product), targets,
        *(_or(t, zeros) for t in per_token), out, rows, cols, v0, per_split,
        product.stride(0), teacher_product.stride(0), out.stride(0), 1.0 / temperature,
        mixture_shift(kind, beta), 1.0 - beta, KIND=KINDS[kind], HAS_BIAS=bias is not None,
        HAS_TEACHER_BIAS=teacher_bias is not None, HAS_ROW_SCALE=inv_bound is not None,
        WITH_DIVERGENCE_GRAD=grad_divergence is not None,
        WITH_LOGPROB_GRAD=grad_logprobs is not None, WITH_RAW_LSE=raw_lse is not None, **cfg)
