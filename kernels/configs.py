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

# The cuBLAS backend's fp32 product chunks (backends/cublas_epilogue.py). Recompute path: a
# vocabulary chunk of every scored row, [N, C], about CUBLAS_CHUNK_BYTES (C = 2048 at
# N = 8192). One-pass (6NHV) path: token chunks of about ONE_PASS_ROWS rows over all of V.
# Each one-pass chunk re-reads the weight twice and reads and writes the fp32 dW accumulator
# once, so the rows set the GEMMs' FLOP per byte: the dW update does rows / 4 FLOP per byte
# of its fp32 accumulator, above an H200's ~184 (790 TFLOP/s over 4.3 TB/s) only from about
# 740 rows (benchmarks/notes.md, G5). Groups larger than ONE_PASS_BYTES of products are
# recomputed instead (fused_losses.backends: the one-pass bound).
CUBLAS_CHUNK_BYTES = 64 << 20
ONE_PASS_ROWS = 1024
ONE_PASS_BYTES = 1 << 30
# Under the interpreter a few KiB of products, so that tests cross chunk edges.
INTERPRETER_CHUNK_BYTES = 4 << 10

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
}

# The epilogue kernels (epilogue.py) stream a GEMM-formed chunk once, so they are memory-bound:
# every tile step loads 4096 fp32 entries (16 KiB, 32 per thread as 16-byte vectors). A chunk
# of few rows (a token chunk of the one-pass path: 512 rows x all of V) takes shorter, wider
# tiles, so that the grid still covers the device while a program owns whole rows, which the
# in-place gradient needs. Tiles in preference order; ``epilogue_config`` picks the first
# whose grid has at least two programs per multiprocessor.
EPILOGUE_TILES = (
    dict(BLOCK_N=16, BLOCK_V=256, num_warps=4, num_stages=1),
    dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4, num_stages=1),
    dict(BLOCK_N=1, BLOCK_V=4096, num_warps=4, num_stages=1),
)

# Under TRITON_INTERPRET=1 small blocks keep tests fast and cross many tile edges.
INTERPRETER = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=2, num_warps=4,
                num_stages=1),
    "epilogue": dict(BLOCK_N=4, BLOCK_V=16, num_warps=4, num_stages=1),
}

SHIPPED = [(kernel, dtype_class, cfg) for kernel, table in _GPU.items()
           for dtype_class, cfg in table.items()]


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config_for(kernel: str, dtype: torch.dtype, interpreting: bool) -> dict:
    if interpreting:
        return dict(INTERPRETER[kernel])
    return dict(_GPU[kernel][dtype_class(dtype)])


def epilogue_config(rows: int, multiprocessors: int, interpreting: bool) -> dict:
    """The epilogue tile for a chunk of ``rows`` rows (see ``EPILOGUE_TILES``)."""
    if interpreting:
        return dict(INTERPRETER["epilogue"])
    for tile in EPILOGUE_TILES:
        if -(-rows // tile["BLOCK_N"]) >= 2 * multiprocessors:
            return dict(tile)
    return dict(EPILOGUE_TILES[-1])


def product_columns(rows: int, vocab: int, budget: int) -> int:
    """Vocabulary columns of a recompute-path chunk: ``[rows, columns]`` fp32 within
    ``budget``, a multiple of 128 when that wide (aligned rows, whole epilogue tiles)."""
    columns = max(1, budget // (4 * max(rows, 1)))
    if columns >= 128:
        columns -= columns % 128
    return min(columns, vocab)


def one_pass_rows(vocab: int, interpreting: bool) -> int:
    """Token rows per one-pass chunk (groups may make a chunk longer or shorter)."""
    if interpreting:
        return max(1, INTERPRETER_CHUNK_BYTES // (4 * vocab))
    return ONE_PASS_ROWS


def chunk_width(num_rows: int, vocab: int, itemsize: int, block_v: int,
                budget: int = GRAD_CHUNK_BYTES) -> int:
    """The backward's vocabulary columns per chunk: a multiple of ``block_v`` whose
    ``[num_rows, columns]`` gradient fits ``budget`` bytes; at least one tile, at most V."""
    tiles = max(1, budget // (max(num_rows, 1) * itemsize * block_v))
    return min(tiles * block_v, -(-vocab // block_v) * block_v)
