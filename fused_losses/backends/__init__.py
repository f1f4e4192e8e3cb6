"""The backends behind the primitive: one interface, one registry, one dispatcher.

A backend is a module that computes the primitive's per-token statistics and its input
gradients without materialising the ``[N, V]`` logits. The autograd Functions in
:mod:`fused_losses.primitive` call these functions and nothing else, so every backend is
interchangeable and every test runs on each of them.

Notation (``objectives.md``, Notation): ``hidden [M, H]`` all rows of the batch, ``rows [N]``
int64 the scored rows (ignored positions are compacted away before any backend runs),
``targets [N]`` int64 their target ids in ``[0, V)``, ``weight [V, H]``, ``bias [V]`` or None.
Logits ``z = cap((hidden[rows] @ weight.T + bias) / temperature)`` with
``cap(x) = softcap * tanh(x / softcap)`` when ``softcap`` is set, formed in fp32 (fp64 for
fp64 inputs) whatever the input dtype. Tensors may have any strides (a transposed or sliced
weight, a strided hidden); ``weight`` and ``hidden`` have one dtype (the primitive casts to
the compute dtype first). Per-token vectors passed in (``lse``, ``entropy``, the ``grad_*``)
are contiguous ``[N]`` fp32 (fp64 for fp64 inputs).

Every backend module provides::

    NAME: str                # its name in BACKENDS
    OPTIONS: frozenset[str]  # backend-only keywords it accepts, e.g. {"chunk_size"}

    forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, **OPTIONS)
        -> (logprobs, lse, argmax, entropy, logits_mean)     # [N] each; None if not asked

    backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, **OPTIONS)
        -> (grad_hidden [M, H], grad_weight [V, H], grad_bias [V])   # None where not needed

and, when it can form the gradients in the same pass as the loss (3 matmuls, not 4)::

    ONE_PASS_BYTES: int      # the largest group [rows, V] of fp32 logits it holds at once
    forward_backward(hidden, weight, bias, rows, targets, head, *, boundaries=None,
                     need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
                     softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
                     with_logits_mean=False, **OPTIONS)
        -> (loss, grad_hidden, grad_weight, grad_bias)

``head(stats, piece) -> (loss, Grads)`` is called once per chunk of whole groups (``piece``
a slice of ``rows``; chunks end only at ``boundaries``, the groups' end offsets) with that
chunk's five statistics, and returns the chunk's loss and its four per-token upstream
gradients. The gradients of ``backward``/``forward_backward`` are in the input dtype;
``grad_hidden`` is zero on unscored rows; ``grad_weight`` is contiguous whatever the layout
of ``weight``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["BACKENDS", "CUDA_DEFAULT", "resolve_backend"]


@dataclass(frozen=True)
class _Entry:
    module: str  # submodule of fused_losses.backends, imported on first use
    triton: bool  # runs Triton kernels: CUDA tensors, or CPU ones under TRITON_INTERPRET=1


# Adding a backend is one entry here (and its module).
_REGISTRY = {
    "torch": _Entry("torch_chunked", triton=False),
    "triton": _Entry("triton_fused", triton=True),
}

# The user-facing names, "auto" first: it picks CUDA_DEFAULT on CUDA when Triton imports,
# "torch" elsewhere.
BACKENDS = ("auto", *_REGISTRY)

# "auto" on CUDA. A prediction until a GPU measurement replaces it (benchmarks/notes.md).
CUDA_DEFAULT = "triton"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> ModuleType:
    return importlib.import_module(f".{_REGISTRY[name].module}", __name__)


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; errors list the valid names.

    ``"auto"``: :data:`CUDA_DEFAULT` on CUDA when Triton imports, else ``"torch"``. A Triton
    backend on a non-CUDA device runs only under the interpreter (``TRITON_INTERPRET=1``).
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            try:
                return _load(CUDA_DEFAULT)
            except ImportError:
                pass
        return _load("torch")
    if _REGISTRY[name].triton and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend={name!r} needs CUDA tensors (got device {device}); CPU tensors run only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    try:
        return _load(name)
    except ImportError as err:
        raise ValueError(f"backend={name!r} needs Triton, which does not import here "
                         f"({err}); use backend='torch'") from err

