"""Triton kernels for the fused log-prob primitive (installed as ``fused_losses.kernels``).

``forward`` and ``backward`` have the same signatures as ``fused_losses._torch_backend`` so
the autograd Function can use either module as its backend.
"""
from .logprobs_bwd import backward
from .logprobs_fwd import forward

__all__ = ["forward", "backward"]
