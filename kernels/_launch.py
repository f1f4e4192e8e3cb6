"""Host-side helpers shared by the launchers: input checks, configs and launch flags."""
from __future__ import annotations

import os

import torch

from . import configs

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(hidden, weight, bias) -> None:
    if hidden.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16; got hidden "
                        f"dtype {hidden.dtype} (use backend='torch' for float64)")
    if hidden.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors, got device {hidden.device}")


def contiguous(*vectors):
    """The [V]/[N] vectors the kernels index as ``ptr + offs``: contiguous copies where they
    are not (an upstream gradient can arrive expanded, with stride 0). hidden and weight
    need no copy: the kernels take their strides."""
    return tuple(None if t is None else t.contiguous() for t in vectors)


def config(kernel: str, hidden: torch.Tensor, sizes=None, run=None) -> dict:
    """The block config of ``kernel``; with ``sizes = (N, V, H)`` and ``run(config)`` (the
    launcher itself) the tuned one when ``FUSED_LOSSES_AUTOTUNE=1`` (``configs.tuned``)."""
    if interpreting() or hidden.device.type != "cuda":
        return configs.config_for(kernel, hidden.dtype, interpreting())
    if run is None:
        return configs.config_for(kernel, hidden.dtype, False, configs.arch_of(hidden.device))
    return configs.tuned(kernel, hidden.dtype, sizes, hidden.device, run)


def grad_chunk_bytes() -> int:
    return configs.INTERPRETER_GRAD_CHUNK_BYTES if interpreting() else configs.GRAD_CHUNK_BYTES


def dot_flags(hidden: torch.Tensor) -> dict:
    # fp32 inputs get IEEE fp32 products (not TF32) so results match torch's fp32 matmul.
    return dict(DOT_FP32=interpreting() and hidden.dtype != torch.float32,
                DOT_PRECISION="ieee")


def vocab_splits(token_tiles: int, vocab_tiles: int, device: torch.device,
                 token_tile_bytes: int = 0) -> int:
    """Enough vocabulary splits that the grid fills the device about four times over, and
    (with the grouped order) that the hidden rows of the programs resident at once, about two
    per multiprocessor over ``splits`` splits each, take at most half of L2: with fewer
    splits every program re-reads its ``token_tile_bytes`` from HBM per vocabulary tile."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    programs = 4 * props.multi_processor_count
    resident_bytes = 2 * props.multi_processor_count * token_tile_bytes
    for_l2 = -(-resident_bytes // max(getattr(props, "L2_cache_size", 0) // 2, 1))
    return max(1, min(vocab_tiles, max(-(-programs // token_tiles), for_l2)))
