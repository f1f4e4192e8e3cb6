"""Triton kernels for the fused log-prob primitive (installed as ``fused_losses.kernels``).

One kernel family per file, each with its launcher: ``logprobs_fwd.forward`` and
``logprobs_bwd.backward`` take the arguments of the backend interface
(``fused_losses.backends``); ``fused_losses.backends.triton_fused`` exposes them. Importing
this package does not import Triton, so ``configs`` (block shapes, chunk budget) can be read
where Triton is not installed.
"""
