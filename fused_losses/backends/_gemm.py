"""torch GEMMs with fp32 results (cuBLAS on CUDA), for the backends that chunk around them.

On CUDA, 16-bit operands go to cuBLAS with ``out_dtype=torch.float32`` (torch >= 2.8): fp32
accumulation and an fp32 result, no rounding to the input dtype in between. On the CPU (the
tests) 16-bit operands are upcast first, which gives the fp32 products of the same values.
Without ``out_dtype`` (torch < 2.8 on CUDA) each product is rounded once to the input dtype
before it is added in fp32.
"""
from __future__ import annotations

import torch


def fp32_products(device: torch.device) -> bool:
    """Whether cuBLAS can write fp32 from 16-bit operands here (``out_dtype``, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype_out")


def product_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of a logits GEMM's result: fp32 wherever it can be had directly."""
    if hidden.dtype == torch.float32 or hidden.device.type != "cuda" \
            or fp32_products(hidden.device):
        return torch.float32
    return hidden.dtype


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False,
           alpha: float = 1.0) -> None:
    """``out = alpha * a @ b`` (``+=`` with ``accumulate``) with fp32 accumulation; ``out`` is
    fp32 or the operands' dtype (then rounded once, at the end of cuBLAS's fp32 sum)."""
    beta = 1.0 if accumulate else 0.0
    if out.dtype == a.dtype:  # beta = 0: out's old content, NaN included, is ignored
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    elif a.device.type != "cuda":  # CPU tests: the fp32 product of the same 16-bit values
        torch.addmm(out, a.float(), b.float(), beta=beta, alpha=alpha, out=out)
    elif fp32_products(a.device):
        if accumulate:
            torch.addmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            if alpha != 1.0:
                out.mul_(alpha)
    elif accumulate:  # torch < 2.8: each product rounded once, the running sum stays fp32
        out.add_(a @ b, alpha=alpha)
    else:
        torch.mul(a @ b, alpha, out=out)
