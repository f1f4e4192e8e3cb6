"""Block configurations for every kernel: one known-good default per (kernel, dtype class).

Every configuration listed in ``SHIPPED`` is compiled for sm_80 and sm_90 by the test suite
(``tests/kernels/test_compile.py``), which also checks it fits those chips' shared memory.
These defaults are conservative starting points, not measured optima: tuning needs a GPU and
is tracked in ``benchmarks/notes.md``.
"""
from __future__ import annotations

import torch

# The backward's logit-gradient chunk ([N, VC] in the weight dtype): VC is the widest multiple
# of BLOCK_V that fits. Under the interpreter a few KiB, so that tests cross chunk edges.
GRAD_CHUNK_BYTES = 64 << 20
INTERPRETER_GRAD_CHUNK_BYTES = 4 << 10

# Shared memory per block (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_GPU = {
    # kernel -> dtype class -> meta-parameters. Chosen as the largest tiles that compile for
    # sm_80 and sm_90 with no register spills as a launch on an LLM head specialises them
    # (cuobjdump STACK = 0, see compile_probe.py); the compile test keeps them spill-free.
    # Larger 16-bit tiles ([128, 128] logit tiles, 256-wide GEMM outputs) spill on sm_80.
    "fwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=2),
    },
    # All three backward kernels: the GEMMs' M and K blocks are the gradient tiles
    # (BLOCK_N x BLOCK_V) so that filtering can skip whole K blocks; BLOCK_OUT is the width of
    # their output tiles along H.
    "bwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, BLOCK_OUT=128, GROUP_N=8,
                      num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, BLOCK_OUT=32, GROUP_N=8,
                     num_warps=8, num_stages=2),
    },
    # Distillation (kernels/divergence.py): the statistics kernels hold two logit tiles
    # (student and teacher), so the fp32 tiles are half the logprobs ones (larger fp32 tiles
    # spill); the gradient kernel feeds the same dH/dW GEMM kernels as "bwd".
    "divergence_fwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, num_warps=4, num_stages=2),
    },
    "divergence_bwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, BLOCK_OUT=128, GROUP_N=8,
                      num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, BLOCK_OUT=32, GROUP_N=8,
                     num_warps=4, num_stages=2),
    },
}

# Under TRITON_INTERPRET=1 small blocks keep tests fast and cross many tile edges.
INTERPRETER = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=2, num_warps=4,
                num_stages=1),
    "divergence_fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1),
    "divergence_bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=2,
                           num_warps=4, num_stages=1),
}

SHIPPED = [(kernel, dtype_class, cfg) for kernel, table in _GPU.items()
           for dtype_class, cfg in table.items()]


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config_for(kernel: str, dtype: torch.dtype, interpreting: bool) -> dict:
    if interpreting:
        return dict(INTERPRETER[kernel])
    return dict(_GPU[kernel][dtype_class(dtype)])


def chunk_width(num_rows: int, vocab: int, itemsize: int, block_v: int,
                budget: int = GRAD_CHUNK_BYTES) -> int:
    """The backward's vocabulary columns per chunk: a multiple of ``block_v`` whose
    ``[num_rows, columns]`` gradient fits ``budget`` bytes; at least one tile, at most V."""
    tiles = max(1, budget // (max(num_rows, 1) * itemsize * block_v))
    return min(tiles * block_v, -(-vocab // block_v) * block_v)
