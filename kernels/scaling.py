"""The per-token scaling of fp16 logit-gradient chunks, one convention for every backend.

Pure torch (no Triton), so the chunked PyTorch backend uses it too. A backend that stores a
chunk of the logit gradient in fp16 before its GEMMs stores row ``i`` as
``grad_i / bound_i`` (``bound_i`` from :func:`grad_bound`, so every stored entry is at most
``1 / temperature`` in magnitude), then

* ``dH_i = bound_i * (chunk_i @ W)``, unscaled in fp32 after the GEMM;
* ``dW = max_bound * chunkᵀ @ (hidden * ratio)`` with ``ratio_i = bound_i / max_bound``,
  ``max_bound`` the largest bound among the rows that GEMM sums: the other operand is scaled
  instead, in the input dtype, and the fp32 result unscaled.

Why: a loss averaged over N tokens hands each token ``g ~ 1/N``; at V = 128256 and N = 8192
the softmax entries ``p * g`` are near 1e-9, below fp16's smallest subnormal (6e-8), so an
unscaled fp16 chunk drops the softmax term. bf16 and fp32 have fp32's exponent range: their
chunks are stored unscaled (:func:`needs_row_scale`).

What fp16 without loss scaling still cannot do: represent gradients that are themselves
below fp16's range. dH and dW are returned in fp16; an entry under 6e-8 is 0 and entries
under 6e-5 lose precision, exactly as with ``F.linear`` + ``F.cross_entropy`` in fp16. Use a
loss scaler (``torch.amp.GradScaler``) or bf16 when the gradients are that small.
"""
from __future__ import annotations

import torch


def needs_row_scale(dtype: torch.dtype) -> bool:
    return dtype == torch.float16


def grad_bound(grad_logprobs, grad_lse, grad_entropy, grad_logits_mean, entropy,
               vocab: int) -> torch.Tensor:
    """Per-token bound on ``|dL/dz_v|`` before the soft-cap and temperature factors; [n].

    The logit gradient is ``p (g_lse - g_lp - g_ent (z - mu)) + g_lp onehot + g_mean / V``;
    ``|p_v (z_v - mu)| <= max(H, 1/e)`` with ``H = lse - mu`` the entropy, so every entry is
    at most ``|g_lse| + 2 |g_lp| + |g_ent| max(H, 1) + |g_mean| / V``. A row without any
    upstream gradient gets 1; NaN propagates (a NaN row stays NaN when scaled).
    """
    present = next(t for t in (grad_logprobs, grad_lse, grad_entropy, grad_logits_mean)
                   if t is not None)
    bound = torch.zeros_like(present)
    if grad_lse is not None:
        bound += grad_lse.abs()
    if grad_logprobs is not None:
        bound += 2.0 * grad_logprobs.abs()
    if grad_entropy is not None:
        bound += grad_entropy.abs() * entropy.clamp(min=1.0)
    if grad_logits_mean is not None:
        bound += grad_logits_mean.abs() / vocab
    return torch.where(bound == 0, 1.0, bound)


def divergence_grad_bound(kind: str, beta: float, temperature: float, aux, grad_divergence,
                          grad_logprobs) -> torch.Tensor:
    """The distillation primitive's per-token bound on ``|dL/dz_v|`` (``fused_losses.
    divergence``: ``dL/dz = g_D/τ · dD/ds + g_lp (onehot(y) − softmax(z))``); [n].

    ``|dD/ds_v|`` is at most 1 for forward KL (``q − p``); ``2D + 1`` for reverse KL
    (``q (log q − log p − D)``: each term ``q (log q − log p)`` is at least ``q − p ≥ −1`` and
    the terms sum to D, so none exceeds ``D + 1``); ``2β`` for JSD (``(1−β) q (σ⁺(d) − S)``:
    ``q σ⁺(d) = q log(1 + βp/((1−β)q)) ≤ βp/(1−β)``, and S sums those terms). ``aux`` is D
    for reverse KL (unused otherwise). A row without any upstream gradient gets 1.
    """
    present = grad_divergence if grad_divergence is not None else grad_logprobs
    bound = torch.zeros_like(present)
    if grad_divergence is not None:
        if kind == "reverse_kl":
            slope = 2.0 * aux.abs() + 1.0
        else:
            slope = 1.0 if kind == "forward_kl" else 2.0 * beta
        bound += grad_divergence.abs() * slope / temperature
    if grad_logprobs is not None:
        bound += grad_logprobs.abs()
    return torch.where(bound == 0, 1.0, bound)
