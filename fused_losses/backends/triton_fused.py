"""The fused Triton kernels as a backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Thin: the launchers in ``kernels/`` (installed as ``fused_losses.kernels``) already take the
interface's arguments (:mod:`fused_losses.backends`). The forward walks logit tiles with an
online log-sum-exp; the backward recomputes each tile once per vocabulary chunk and feeds the
chunk's logit gradient to the dH and dW GEMMs. Importing this module imports Triton.
"""
from ..kernels.logprobs_bwd import backward
from ..kernels.logprobs_fwd import forward

NAME = "triton"
OPTIONS = frozenset()  # the kernels tile by themselves: no chunk_size

__all__ = ["forward", "backward"]
