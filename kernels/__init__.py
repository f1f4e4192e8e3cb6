"""Triton kernels for the fused log-prob primitive (installed as ``fused_losses.kernels``).

``forward`` and ``backward`` have the same signatures as ``fused_losses._torch_backend`` so
the autograd Function can use either module as its backend. They are imported on first use,
so ``configs`` (block shapes, chunk budget) can be read where Triton is not installed.
"""
import importlib

_LAUNCHERS = {"forward": ".logprobs_fwd", "backward": ".logprobs_bwd"}

__all__ = ["forward", "backward"]


def __getattr__(name: str):
    if name not in _LAUNCHERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    launcher = getattr(importlib.import_module(_LAUNCHERS[name], __name__), name)
    globals()[name] = launcher
    return launcher
