"""Block configurations for every kernel: one known-good default per (kernel, dtype class).

Every configuration listed in ``SHIPPED`` is compiled for sm_80 and sm_90 by the test suite
(``tests/kernels/test_compile.py``), which also checks it fits those chips' shared memory.
These defaults are conservative starting points, not measured optima: tuning needs a GPU and
is tracked in ``benchmarks/NOTES.md``.
"""
from __future__ import annotations

import torch

# Shared memory per block (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_GPU = {
    # kernel -> dtype class -> meta-parameters. Chosen as the largest tiles that compile for
    # sm_80 and sm_90 with no register spills (cuobjdump STACK = 0, see compile_probe.py); the
    # compile test keeps them spill-free.
    "fwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=3),
    },
    "bwd_dh": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=16, num_warps=8, num_stages=2),
    },
    "bwd_dw": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=2),
    },
}

# Under TRITON_INTERPRET=1 small blocks keep tests fast and cross many tile edges.
INTERPRETER = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1)

SHIPPED = [(kernel, dtype_class, cfg) for kernel, table in _GPU.items()
           for dtype_class, cfg in table.items()]


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config_for(kernel: str, dtype: torch.dtype, interpreting: bool) -> dict:
    if interpreting:
        return dict(INTERPRETER)
    return dict(_GPU[kernel][dtype_class(dtype)])
