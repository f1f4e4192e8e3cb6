"""The logits GEMM of the Triton one-pass path: raw products of a token chunk, in fp32.

``products[i, v] = hidden[rows[i]] @ weight[v]`` for a chunk of ``N`` scored rows over all of
``V``, written as an fp32 ``[N, V]`` matrix (row stride ``stride_pn``) for the epilogue kernels
(``epilogue.py``), which apply bias, temperature and soft-cap on the fly. Grid
``(cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V),)`` in grouped order (``_tl_helpers.grouped_tile``);
program (i, j) owns one ``[BLOCK_N, BLOCK_V]`` tile: the K loop over H of the logit tile
(``_tl_helpers.logits_tile``, fp32 accumulation), then one store. The block configuration is
the backward's (its gradient kernel walks the same logit tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._tl_helpers import grouped_tile, logits_tile


@triton.jit
def _products_kernel(
    hidden_ptr, weight_ptr, rows_ptr,               # [M, H], [V, H], [N]
    products_ptr,                                   # -> [N, V] fp32
    N, V, H, stride_hm, stride_hh, stride_wv, stride_wh, stride_pn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V),
                                GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    acc = logits_tile(hidden_ptr, weight_ptr, weight_ptr, rows, offs_v, mask_n, mask_v,
                      H, stride_hm, stride_hh, stride_wv, stride_wh, 1.0, 1.0,
                      BLOCK_N, BLOCK_V, BLOCK_H, False, False, DOT_FP32, DOT_PRECISION)
    out = products_ptr + offs_n.to(tl.int64)[:, None] * stride_pn + offs_v[None, :]
    tl.store(out, acc, mask=mask_n[:, None] & mask_v[None, :])


def products(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
             out: torch.Tensor) -> None:
    """``out [N, V]`` fp32 (inner stride 1) ``= hidden[rows] @ weight.T``; any strides of
    ``hidden`` and ``weight``."""
    num_rows, vocab, width = rows.numel(), weight.shape[0], weight.shape[1]
    if out.shape != (num_rows, vocab) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"products out {tuple(out.shape)} {out.dtype} strides {out.stride()}: "
                         f"expected [{num_rows}, {vocab}] float32 with inner stride 1")
    if num_rows == 0:
        return
    cfg = _launch.config("bwd", hidden)
    grid = (triton.cdiv(num_rows, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
    _products_kernel[grid](
        hidden, weight, rows.contiguous(), out, num_rows, vocab, width,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        GROUP_N=cfg["GROUP_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_launch.dot_flags(hidden))
