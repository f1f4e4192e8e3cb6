"""The fused Triton implementation: launchers in ``fused_losses.kernels.divergence``.

Imported only when chosen, so Triton stays optional. Same signatures as ``torch_chunked``
(less ``chunk_size``: the kernels tile by themselves); no one-pass ``forward_backward``: the
backward recomputes both tiles instead of holding dW from forward to backward.
"""
from __future__ import annotations


def _kernels():
    from ..kernels import divergence  # ImportError here without triton

    return divergence


def forward(*args, **kwargs):
    return _kernels().forward(*args, **kwargs)


def backward(*args, **kwargs):
    return _kernels().backward(*args, **kwargs)


def available() -> None:
    """Raise ImportError now (at dispatch) rather than at the first launch."""
    _kernels()
