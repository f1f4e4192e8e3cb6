"""Block configurations: one known-good default per (kernel, dtype class), and a tuning space.

Every default (``SHIPPED``) is compiled for its targets (sm_80, sm_90) by the test suite
(``tests/kernels/test_compile.py``: no spills, fits shared memory, pipelined, wgmma), and so is
every member of the autotune space (``SPACE``, the slow part of that test). Tuning is opt-in,
as in Cut Cross-Entropy: with ``FUSED_LOSSES_AUTOTUNE=1`` on CUDA, :func:`tuned` times each
member of the space that fits the device's shared memory by running the launcher with it, once
per (kernel, dtype, V, H, bucket of N, device capability), and keeps the fastest for the
process. The defaults are predictions from the compile reports, not measured optima
(``benchmarks/notes.md``).
"""
from __future__ import annotations

import itertools
import os
from typing import Callable

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
    # The forward's online statistics spill beyond a [64, 128] tile with 8 warps; the
    # backward's kernels (and the one-pass products kernel) hold one accumulator and take
    # [128, 128] tiles: 64 FLOP per byte loaded per K step against 43 at [64, 128], and
    # 196 KiB of shared memory for the dH GEMM on sm_90 (131 KiB on sm_80).
    "fwd": {
        "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8,
                      num_stages=3),
        "fp32": dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=16, GROUP_N=8, num_warps=8, num_stages=2),
    },
    # All backward kernels: the GEMMs' M and K blocks are the gradient tiles
    # (BLOCK_N x BLOCK_V) so that filtering can skip whole K blocks; BLOCK_OUT is the width of
    # their output tiles along H. GROUP_N is every kernel's group of the grouped program order
    # (_tl_helpers.grouped_tile): token tiles, except vocabulary tiles in the dW GEMM
    # (logprobs_bwd's docstring: which axis each GEMM groups, and why).
    "bwd": {
        "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, BLOCK_OUT=128, GROUP_N=8,
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

# The autotune space per kernel and dtype class: the default first, then tile shapes around it.
# Pruned by what the compile probe showed (tests/kernels/compile_probe.py, sm_80 and sm_90):
# the forward's online statistics keep about five [BLOCK_N, BLOCK_V] fp32 tiles live, so it
# spills beyond 32 accumulator entries per thread; the backward kernels hold one GEMM
# accumulator and stay spill-free up to 64. fp32 (a correctness path: IEEE products on CUDA
# cores) keeps the few shapes found spill-free on both targets. Every member is spill-free and
# pipelined on both (the slow compile test). Members over a device's shared memory are dropped
# at run time (:func:`shared_memory`, an upper bound of what the compiler allocates).
def _grid(base: dict, **axes) -> list[dict]:
    names = list(axes)
    return [dict(base, **dict(zip(names, values)))
            for values in itertools.product(*(axes[n] for n in names))]


def _entries_per_thread(cfg: dict, *dims: str) -> int:
    return cfg[dims[0]] * cfg[dims[1]] // (32 * cfg["num_warps"])


SPACE = {
    "fwd": {
        "16bit": [c for c in _grid(dict(BLOCK_H=64, GROUP_N=8), BLOCK_N=(64, 128),
                                   BLOCK_V=(64, 128, 256),
                                   num_warps=(4, 8), num_stages=(3, 4))
                  if _entries_per_thread(c, "BLOCK_N", "BLOCK_V") <= 32],
        "fp32": [dict(BLOCK_N=n, BLOCK_V=v, BLOCK_H=16, GROUP_N=8, num_warps=w, num_stages=s)
                 for n, v, w, s in ((64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3),
                                    (64, 128, 8, 3), (128, 64, 8, 3))],
    },
    "bwd": {
        "16bit": [c for c in _grid(dict(BLOCK_H=64, GROUP_N=8), BLOCK_N=(64, 128),
                                   BLOCK_V=(64, 128), BLOCK_OUT=(128, 256), num_warps=(4, 8),
                                   num_stages=(3, 4))
                  if max(_entries_per_thread(c, "BLOCK_N", "BLOCK_V"),
                         _entries_per_thread(c, "BLOCK_N", "BLOCK_OUT"),
                         _entries_per_thread(c, "BLOCK_V", "BLOCK_OUT")) <= 64],
        "fp32": [dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, BLOCK_OUT=32, GROUP_N=8, num_warps=8,
                      num_stages=3)],
    },
}
for _kernel, _table in SPACE.items():  # the default leads its space
    for _cls, _members in _table.items():
        _default = _GPU[_kernel][_cls]
        _table[_cls] = [_default] + [m for m in _members if m != _default]


# The epilogue kernels (epilogue.py) stream a GEMM-formed chunk once, so they are memory-bound:
# every tile step loads 4096 fp32 entries (16 KiB, 16 per thread as 16-byte vectors). A chunk
# of few rows (a token chunk of the one-pass path: 1024 rows x all of V) takes shorter, wider
# tiles, so that the grid still covers the device while a program owns whole rows, which the
# in-place gradient needs. Tiles in preference order; ``epilogue_config`` picks the first
# whose grid has at least two programs per multiprocessor.
EPILOGUE_TILES = (
    dict(BLOCK_N=16, BLOCK_V=256, num_warps=8, num_stages=1),
    dict(BLOCK_N=4, BLOCK_V=1024, num_warps=8, num_stages=1),
    dict(BLOCK_N=1, BLOCK_V=4096, num_warps=8, num_stages=1),
)
# The distillation epilogues (divergence_epilogue.py) stream two chunks per tile step (student
# and teacher) and keep both models' statistics. With one row per program ptxas capped them at
# 80 registers and spilled 8-16 bytes on some targets, so they stop at four rows: a one-pass
# chunk of 1024 rows then has 256 programs (15 warps per multiprocessor on an H200, ~60 KB of
# loads in flight each: enough for a stream).
DIVERGENCE_EPILOGUE_TILES = EPILOGUE_TILES[:2]

# Under TRITON_INTERPRET=1 small blocks keep tests fast and cross many tile edges.
INTERPRETER = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=2, num_warps=4,
                num_stages=1),
    "epilogue": dict(BLOCK_N=8, BLOCK_V=32, num_warps=4, num_stages=1),
    "divergence_fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1),
    "divergence_bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=2,
                           num_warps=4, num_stages=1),
}

# Ampere (sm_8x) keeps the smaller backward tile: with every flag on (entropy gradient,
# soft-cap, filter, fp16 row scale, bias) the [128, 128] gradient kernel spills 192-208 bytes
# there, and not on sm_90.
_GPU_SM80 = {("bwd", "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, BLOCK_OUT=128, GROUP_N=8,
                                    num_warps=8, num_stages=3)}

# Every default the compile test checks: (kernel family, dtype class, config, target archs).
SHIPPED = [(kernel, cls, cfg, (90,) if (kernel, cls) in _GPU_SM80 else (80, 90))
           for kernel, table in _GPU.items() for cls, cfg in table.items()] + [
    (kernel, cls, cfg, (80,)) for (kernel, cls), cfg in _GPU_SM80.items()] + [
    ("epilogue", cls, tile, (80, 90)) for tile in EPILOGUE_TILES for cls in ("16bit", "fp32")] + [
    ("divergence_epilogue", cls, tile, (80, 90)) for tile in DIVERGENCE_EPILOGUE_TILES
    for cls in ("16bit", "fp32")]


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config_for(kernel: str, dtype: torch.dtype, interpreting: bool, arch: int = 90) -> dict:
    """The default of ``kernel`` at ``dtype`` on compute capability ``arch`` (major * 10)."""
    if interpreting:
        return dict(INTERPRETER[kernel])
    cls = dtype_class(dtype)
    if arch < 90 and (kernel, cls) in _GPU_SM80:
        return dict(_GPU_SM80[(kernel, cls)])
    return dict(_GPU[kernel][cls])


def epilogue_config(rows: int, multiprocessors: int, interpreting: bool,
                    tiles: tuple = EPILOGUE_TILES) -> dict:
    """The epilogue tile for a chunk of ``rows`` rows (see ``EPILOGUE_TILES``) among
    ``tiles``."""
    if interpreting:
        return dict(INTERPRETER["epilogue"])
    for tile in tiles:
        if -(-rows // tile["BLOCK_N"]) >= 2 * multiprocessors:
            return dict(tile)
    return dict(tiles[-1])


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


# ---------------------------------------------------------------------------------------------
# Shared memory and opt-in autotuning
# ---------------------------------------------------------------------------------------------

def shared_memory(kernel: str, itemsize: int, cfg: dict) -> int:
    """Bytes of shared memory a config's pipelined loops take: ``num_stages`` buffers of each
    K-step's operand tiles (what Triton allocates on sm_90; sm_80 keeps one buffer fewer), the
    largest over the kernel family."""
    n, v, stages = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["num_stages"]
    per_stage = (n + v) * cfg["BLOCK_H"]                     # logit tile: hidden and weight
    if kernel in ("bwd", "divergence_bwd"):
        out = cfg["BLOCK_OUT"]
        per_stage = max(per_stage, n * v + v * out, v * n + n * out)  # dH and dW GEMMs
    return stages * per_stage * itemsize


def arch_of(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0] * 10


def device_shared_memory(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return limit or SHARED_MEMORY_LIMIT.get(props.major * 10, SHARED_MEMORY_LIMIT[80])


def space(kernel: str, dtype: torch.dtype, limit: int | None = None) -> list[dict]:
    """The tuning space of ``kernel`` at ``dtype``, default first; with ``limit``, only the
    members whose :func:`shared_memory` fits it."""
    itemsize = torch.finfo(dtype).bits // 8
    return [dict(c) for c in SPACE[kernel][dtype_class(dtype)]
            if limit is None or shared_memory(kernel, itemsize, c) <= limit]


AUTOTUNE_VARIABLE = "FUSED_LOSSES_AUTOTUNE"
_TUNED: dict[tuple, dict] = {}


def autotuning() -> bool:
    return os.environ.get(AUTOTUNE_VARIABLE, "0") == "1"


def tokens_bucket(tokens: int) -> int:
    """The key's token count: the next power of two (at least 64)."""
    return max(64, 1 << max(tokens - 1, 1).bit_length())


def tuned(kernel: str, dtype: torch.dtype, sizes: tuple[int, int, int], device: torch.device,
          run: Callable[[dict], object]) -> dict:
    """The config for ``kernel`` at ``sizes = (N, V, H)``: the default; with
    ``FUSED_LOSSES_AUTOTUNE=1`` on CUDA the fastest member of the space, found by timing
    ``run(config)`` (the whole launcher, so that allocations sized by the config count) once
    per key and kept for the process. Members that fail to launch are skipped."""
    if device.type != "cuda":
        return config_for(kernel, dtype, interpreting=False)
    if not autotuning():
        return config_for(kernel, dtype, interpreting=False, arch=arch_of(device))
    tokens, vocab, width = sizes
    key = (kernel, dtype, vocab, width, tokens_bucket(tokens),
           torch.cuda.get_device_capability(device))
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        timings = []
        for cfg in space(kernel, dtype, device_shared_memory(device)):
            try:
                timings.append((do_bench(lambda c=cfg: run(c), return_mode="median"), cfg))
            except OutOfResources:
                continue
        _TUNED[key] = min(timings, key=lambda t: t[0])[1]
    return dict(_TUNED[key])
