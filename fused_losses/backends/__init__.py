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
are ``[N]`` fp32 (fp64 for fp64 inputs) of any strides: the upstream gradient of a ``.sum()``
arrives expanded (stride 0).

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

What every backend computes, exactly (one contract, tested on each registered backend in
``tests/backends/test_contract.py``):

* The logit gradient ``p * (g_lse - g_lp - g_ent * (z - mu)) + g_lp * onehot(y) + g_mean / V``
  (``mu = sum_v p z``), then the soft-cap chain rule and ``1 / temperature``.
* ``filter_eps``: the softmax terms (everything multiplied by ``p``) are dropped where
  ``p < filter_eps``; the target's one-hot term and the ``logits_mean`` term are kept. ``p``
  is the probability itself, not the scaled gradient, so what filtering drops does not depend
  on the loss's reduction or scale (Cut Cross-Entropy compares the softmax, too). A kernel may
  then skip any tile whose filtered gradient is zero everywhere: that changes nothing.
* 16-bit logit-gradient chunks: a backend that stores a chunk of the logit gradient in the
  input dtype before its GEMMs stores fp16 chunks scaled per token and unscales in fp32
  around the GEMMs, by the convention of ``fused_losses/kernels/scaling.py`` (written once
  there, pure torch), so a mean over many tokens keeps its softmax term. bf16 and fp32
  chunks are stored unscaled.
* Non-finite logits: ``-inf`` logits are legal (a vocabulary mask): probability 0, no
  contribution to lse or entropy, zero gradient; ``logits_mean`` is then ``-inf``. A row with
  a NaN or ``+inf`` logit (or only ``-inf`` logits) has NaN logprobs, lse, entropy and
  logits_mean and a NaN gradient row, hence NaN in every entry of dW and dBias (as in torch);
  its argmax is the index of its first NaN if it has one, else of its first maximum
  (torch.argmax's answer). Ignored rows are never read: NaN there reaches nothing.
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
    "cublas": _Entry("cublas_epilogue", triton=True),
}

# The user-facing names, "auto" first: it picks CUDA_DEFAULT on CUDA when Triton imports,
# "torch" elsewhere.
BACKENDS = ("auto", *_REGISTRY)

# "auto" on CUDA. A prediction until a GPU measurement replaces it (benchmarks/notes.md, G5):
# at N = 8192, H = 4096, V = 128256 (bf16, forward + backward) cuBLAS's one pass (6NHV at
# ~88 % of 790 TFLOP/s + ~3 ms of epilogues and fp32 dW traffic) ~44 ms, 1.35x the 32.7 ms
# floor; its recompute path ~54 ms; the fused Triton kernels (8NHV at ~72 %) ~62 ms.
CUDA_DEFAULT = "cublas"


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

