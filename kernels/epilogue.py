"""Epilogues of a GEMM-formed logit chunk: the statistics fold and the in-place logit gradient.

A backend whose logits GEMM is a library call (cuBLAS through ``torch.mm``) or a separate
Triton GEMM forms a chunk of raw products ``product = hidden[rows] @ weight[v0:v0 + C].T``
(``[R, C]`` fp32, row stride ``stride_pr``, vocabulary ids ``v0 ..``) and hands it to these
kernels. They apply the bias, ``1/temperature`` and the soft-cap on the fly
(``z = cap((product + bias) * inv_temperature)``, ``_tl_helpers``) and never write ``z`` back.

* ``_fold_kernel``, grid ``(cdiv(R, BLOCK_N), SPLITS)``: program (i, s) owns token tile i and
  the s-th contiguous column range of the chunk. It continues the online statistics kept in
  slot s of a ``[SPLITS, R]`` state (running max ``m``, ``sum exp(z - m)``,
  ``sum exp(z - m) * z``, ``sum z``, argmax, target logit), so a row's state accumulates over
  vocabulary chunks folded in increasing order; ``statistics`` merges the slots.
* ``_grad_kernel``, grid ``(cdiv(R, BLOCK_N), SPLITS)``: the logit gradient of
  ``objectives.md`` (Notation) ``p*(h - g - e*(z - mu)) + g*onehot(y) + u/V``, soft-cap chain
  rule and ``1/temperature`` included, written in the GEMM operand dtype to ``grad``
  (``[R, C]``, row stride ``stride_gr``). ``grad`` may alias ``product``: a 16-bit gradient
  over the first half of each fp32 row (row stride ``2 * stride_pr``), or an fp32 one over
  the same elements. Then SPLITS must be 1: each program walks its rows' columns in
  increasing order, so every store lands on bytes its own earlier loads already consumed.
  Over the first half of fp32 rows, a 16-bit store lands on entries another warp of the
  program loads (a wide tile spreads a row over several warps, which do not run in step):
  ``NARROW_IN_PLACE`` puts a barrier between each tile's loads and its store.

No atomics: every program owns the state or gradient entries it writes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch, configs
from ._tl_helpers import (finish_logits, grad_logits_tile, load_grad_stats, online_update,
                          store_online_state)
from .logprobs_fwd import _combine


@triton.jit
def _chunk_logits(product_ptr, bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c, stride_pr,
                  inv_temperature, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 logits from the raw products; masked entries hold 0."""
    acc = tl.load(product_ptr + offs_n.to(tl.int64)[:, None] * stride_pr + offs_c[None, :],
                  mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return finish_logits(acc, bias_ptr, offs_v, mask_c, inv_temperature, softcap, HAS_BIAS,
                         HAS_SOFTCAP)


@triton.jit
def _fold_kernel(
    product_ptr, bias_ptr, targets_ptr,                             # [R, C], [V], [R]
    max_ptr, sumexp_ptr, zdot_ptr, zsum_ptr, argmax_ptr, target_ptr,  # state [SPLITS, R] each
    R, C, V, v0, cols_per_split, stride_pr,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, WITH_LOGITS_MEAN: tl.constexpr, WITH_ARGMAX: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < R
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    slot = pid_s.to(tl.int64) * R + offs_n
    running_max = tl.load(max_ptr + slot, mask=mask_n, other=float("-inf"))
    sumexp = tl.load(sumexp_ptr + slot, mask=mask_n, other=0.0)
    target_logit = tl.load(target_ptr + slot, mask=mask_n, other=0.0)
    zdot = sumexp                                      # sum exp(z - m) * z (WITH_ENTROPY)
    zsum = sumexp                                      # sum z (WITH_LOGITS_MEAN)
    best = targets                                     # argmax id (WITH_ARGMAX)
    first_nan = tl.zeros((BLOCK_N,), dtype=tl.int64) + V   # V: no NaN so far
    if WITH_ENTROPY:
        zdot = tl.load(zdot_ptr + slot, mask=mask_n, other=0.0)
    if WITH_LOGITS_MEAN:
        zsum = tl.load(zsum_ptr + slot, mask=mask_n, other=0.0)
    if WITH_ARGMAX:
        best = tl.load(argmax_ptr + slot, mask=mask_n, other=0)
        # an earlier chunk that saw a NaN left max = NaN and its first NaN as the argmax
        first_nan = tl.where(running_max != running_max, best, first_nan)

    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c_start in range(c_begin, c_end, BLOCK_V):
        offs_c = c_start + tl.arange(0, BLOCK_V)
        mask_c = offs_c < c_end
        offs_v = v0 + offs_c.to(tl.int64)
        logits = _chunk_logits(product_ptr, bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c,
                               stride_pr, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        running_max, sumexp, zdot, zsum, best, first_nan, target_logit = online_update(
            logits, offs_v, mask_c, v0 + c_start, targets, V, running_max, sumexp, zdot, zsum,
            best, first_nan, target_logit, WITH_ENTROPY, WITH_LOGITS_MEAN, WITH_ARGMAX)

    # a slot with a NaN keeps its first NaN, and a NaN max for the next chunk and combine
    store_online_state(slot, mask_n, V, running_max, sumexp, zdot, zsum, best, first_nan,
                       target_logit, max_ptr, sumexp_ptr, zdot_ptr, zsum_ptr, argmax_ptr,
                       target_ptr, WITH_ENTROPY, WITH_LOGITS_MEAN, WITH_ARGMAX)


@triton.jit
def _grad_kernel(
    product_ptr, bias_ptr, targets_ptr,                 # [R, C], [V], [R]
    lse_ptr, grad_logprobs_ptr, grad_lse_ptr,           # [R] fp32 each
    grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,     # [R] fp32 each (read when flagged)
    inv_bound_ptr,                                      # [R] fp32 (HAS_ROW_SCALE)
    grad_ptr,                                           # -> [R, C], may alias product
    R, C, v0, cols_per_split, stride_pr, stride_gr,
    inv_vocab, inv_temperature, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, FILTER: tl.constexpr,
    NARROW_IN_PLACE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < R
    targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean = \
        load_grad_stats(offs_n, mask_n, targets_ptr, lse_ptr, grad_logprobs_ptr, grad_lse_ptr,
                        grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr, WITH_ENTROPY_GRAD,
                        WITH_MEAN_GRAD)
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
        logits = _chunk_logits(product_ptr, bias_ptr, offs_n, offs_c, offs_v, mask_n, mask_c,
                               stride_pr, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        grad = grad_logits_tile(logits, offs_v, mask_n, mask_c, targets, lse, grad_logprobs,
                                grad_lse, grad_entropy, mu, grad_logits_mean, inv_vocab,
                                inv_temperature, softcap, filter_eps, HAS_SOFTCAP,
                                WITH_ENTROPY_GRAD, WITH_MEAN_GRAD, FILTER)
        if HAS_ROW_SCALE:
            grad = grad * row_scale[:, None]
        if NARROW_IN_PLACE:
            # In place, the 16-bit gradient of tile k lands on fp32 columns of tile k // 2
            # (tile 0 itself for k = 0), which another warp of this program may not have read
            # yet (the 4- and 1-row tiles spread a row over 4 and 8 warps): every warp has read
            # tile k here. fp32 in place (each entry rewritten by the thread that read it) and
            # out of place need none.
            tl.debug_barrier()
        tl.store(rows_out + offs_c[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_c[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

class FoldState(NamedTuple):
    """Online statistics of R rows in SPLITS slots, ``[SPLITS, R]`` each; None when not asked."""

    max: torch.Tensor
    sumexp: torch.Tensor
    zdot: torch.Tensor | None
    zsum: torch.Tensor | None
    argmax: torch.Tensor | None
    target: torch.Tensor


def fold_state(splits: int, rows: int, device, *, with_argmax=False, with_entropy=False,
               with_logits_mean=False) -> FoldState:
    """The empty state: max -inf, sums 0 (the neutral elements of the merge)."""
    f32 = dict(dtype=torch.float32, device=device)
    return FoldState(
        torch.full((splits, rows), float("-inf"), **f32), torch.zeros(splits, rows, **f32),
        torch.zeros(splits, rows, **f32) if with_entropy else None,
        torch.zeros(splits, rows, **f32) if with_logits_mean else None,
        torch.zeros(splits, rows, dtype=torch.int64, device=device) if with_argmax else None,
        torch.zeros(splits, rows, **f32))


def _config(rows: int, device, tiles: tuple = configs.EPILOGUE_TILES) -> dict:
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 1
    return configs.epilogue_config(rows, multiprocessors, _launch.interpreting(), tiles)


def fold_splits(rows: int, cols: int, device, tiles: tuple = configs.EPILOGUE_TILES) -> int:
    """Column splits for a chunk so that the fold's grid fills the device about four times
    (with the epilogue tile chosen among ``tiles``)."""
    cfg = _config(rows, device, tiles)
    return _launch.vocab_splits(triton.cdiv(rows, cfg["BLOCK_N"]),
                                triton.cdiv(cols, cfg["BLOCK_V"]), device)


def fold(product: torch.Tensor, v0: int, bias, targets: torch.Tensor, state: FoldState, *,
         vocab: int, temperature: float = 1.0, softcap: float | None = None) -> None:
    """Continue ``state`` with ``product`` [R, C] (raw products of vocabulary ids
    ``[v0, v0 + C)`` of ``vocab``, inner stride 1); chunks must come in increasing ``v0``."""
    rows, cols = product.shape
    if rows == 0 or cols == 0:
        return
    _check_chunk(product, targets, state.max.shape[1])
    cfg = _config(rows, product.device)
    splits = state.max.shape[0]
    per_split = triton.cdiv(triton.cdiv(cols, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    _fold_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]), splits)](
        product, bias if bias is not None else product, targets,
        state.max, state.sumexp, _or(state.zdot, state.sumexp), _or(state.zsum, state.sumexp),
        _or(state.argmax, targets), state.target,
        rows, cols, vocab, v0, per_split, product.stride(0),
        1.0 / temperature, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=state.zdot is not None, WITH_LOGITS_MEAN=state.zsum is not None,
        WITH_ARGMAX=state.argmax is not None, **cfg)


def statistics(state: FoldState, vocab: int) -> tuple:
    """(logprobs, lse, argmax, entropy, logits_mean), [R] each, from the merged slots.

    The slots must hold contiguous, increasing vocabulary ranges (ties in the argmax go to
    the lowest slot, hence the lowest id, as ``torch.argmax``)."""
    flags = (state.argmax is not None, state.zdot is not None, state.zsum is not None)
    return _combine(state.max, state.sumexp, state.zdot, state.zsum, state.argmax,
                    state.target, vocab, flags)


def grad(product: torch.Tensor, out: torch.Tensor, v0: int, bias, targets: torch.Tensor,
         lse: torch.Tensor, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean, *,
         vocab: int, temperature: float = 1.0, softcap: float | None = None,
         filter_eps: float | None = None, inv_bound: torch.Tensor | None = None) -> None:
    """Write the logit gradient of the chunk ``product`` [R, C] into ``out`` [R, C].

    ``out`` may share ``product``'s storage with the same row start in bytes (an fp32
    gradient over the same elements, or a 16-bit one over the first half of each row). The
    per-token tensors are [R] fp32, any strides; ``grad_*`` and ``mu`` may be None (no such
    term). ``filter_eps`` drops the softmax terms where ``p < filter_eps``; ``inv_bound``
    ([R], fp16 chunks) multiplies each row before it is stored (``scaling.py``)."""
    rows, cols = product.shape
    if rows == 0 or cols == 0:
        return
    _check_chunk(product, targets, rows)
    if out.shape != product.shape or out.stride(1) != 1:
        raise ValueError(f"gradient chunk {tuple(out.shape)} strides {out.stride()}: expected "
                         f"{tuple(product.shape)} with inner stride 1")
    in_place = out.untyped_storage().data_ptr() == product.untyped_storage().data_ptr()
    cfg = _config(rows, product.device)
    # In place, a program must own whole rows (see the module docstring): one split.
    splits = 1 if in_place else fold_splits(rows, cols, product.device)
    per_split = triton.cdiv(triton.cdiv(cols, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    zeros = torch.zeros(rows, dtype=torch.float32, device=product.device)
    # the kernel indexes [R] vectors as ptr + offs: an expanded (stride-0) upstream gradient,
    # as autograd hands out for a .sum(), gets a contiguous copy
    lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean, inv_bound = \
        _launch.contiguous(lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean,
                           inv_bound)
    _grad_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]), splits)](
        product, bias if bias is not None else product, targets,
        lse, _or(grad_logprobs, zeros), _or(grad_lse, zeros),
        _or(grad_entropy, zeros), _or(mu, zeros), _or(grad_logits_mean, zeros),
        _or(inv_bound, zeros), out, rows, cols, v0, per_split, product.stride(0), out.stride(0),
        1.0 / vocab, 1.0 / temperature, softcap or 1.0, filter_eps or 0.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_ROW_SCALE=inv_bound is not None, WITH_ENTROPY_GRAD=grad_entropy is not None,
        WITH_MEAN_GRAD=grad_logits_mean is not None, FILTER=filter_eps is not None,
        NARROW_IN_PLACE=in_place and out.element_size() < product.element_size(), **cfg)


def _or(tensor, fallback):
    """A pointer the kernel never reads when its flag is off."""
    return fallback if tensor is None else tensor


def _check_chunk(product, targets, rows):
    if product.stride(1) != 1:
        raise ValueError(f"product chunk strides {product.stride()}: expected inner stride 1")
    if targets.shape != (rows,):
        raise ValueError(f"targets {tuple(targets.shape)}: expected [{rows}] (the chunk rows)")
