"""Naive, materialising implementations of the primitive and of cross-entropy.

These form the full ``[tokens x vocab]`` logits, exactly what the library exists to avoid.
They are the ground truth for tests (run in float64) and the "naive PyTorch" baseline for
benchmarks and the unfused trainer path; nothing else in the package imports this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .primitive import LogProbs


def reference_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``softcap·tanh((hidden @ weight.T + bias) / temperature / softcap)``, materialised, [..., V]."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_argmax: bool = False,
    return_entropy: bool = False,
    return_logits_mean: bool = False,
) -> LogProbs:
    """Same contract as :func:`fused_losses.linear_logprobs`, computed on materialised logits.

    Outputs keep the input dtype (float64 in tests) instead of float32, so a float64 call is
    an exact reference.
    """
    logits = reference_logits(hidden, weight, bias, temperature=temperature, softcap=softcap)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    logprobs = torch.where(valid, logprobs, zero)
    lse = argmax = entropy = logits_mean = None
    if return_lse:
        lse = torch.where(valid, torch.logsumexp(logits, dim=-1), zero)
    if return_argmax:
        argmax = torch.where(valid, logits.argmax(dim=-1), torch.full_like(targets, ignore_index))
    if return_entropy:
        # p log p is 0 at a -inf logit (p = 0), in value and gradient; NaN still propagates
        probs = log_p.exp()
        safe_log_p = torch.where(probs == 0, zero, log_p)
        entropy = torch.where(valid, -torch.where(probs == 0, zero, probs * safe_log_p).sum(-1),
                              zero)
    if return_logits_mean:
        logits_mean = torch.where(valid, logits.mean(-1), zero)
    return LogProbs(logprobs, lse, argmax, entropy, logits_mean)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy (+ label smoothing, z-loss) on materialised logits."""
    logits = reference_logits(hidden, weight, bias, temperature=temperature, softcap=softcap)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    per_token = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )
    if lse_square_scale:
        valid = flat_targets != ignore_index
        per_token = per_token + lse_square_scale * torch.logsumexp(flat_logits, -1).square() * valid
    per_token = per_token.reshape(targets.shape)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum" and num_items_in_batch is None:
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    # All-ignored input is a zero loss with zero gradient, not 0/0.
    return total / (targets != ignore_index).sum().clamp(min=1)


def distill_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """:func:`fused_losses.distill_loss` on both models' materialised logits (its ``loss``).

    [B, T] Hugging Face labels, shifted here; the divergences as TRL GKD's
    ``generalized_jsd_loss`` writes them (``F.kl_div`` on log-probs, the mixture's log by
    ``logsumexp``, β = 0 / 1 as forward / reverse KL); the hard term is the cross-entropy at
    temperature 1. The teacher gets no gradient.
    """
    def upcast(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    logits = upcast(reference_logits(hidden[:, :-1], weight, bias))
    with torch.no_grad():
        teacher = upcast(reference_logits(teacher_hidden[:, :-1], teacher_weight, teacher_bias))
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(logits.dtype) / temperature, dim=-1)
    if divergence == "jsd" and beta in (0, 1):
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    if divergence == "forward_kl":
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta),
                                             log_p + math.log(beta)]), dim=0)
        per_token = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                     + (1 - beta) * F.kl_div(log_m, log_q, reduction="none",
                                             log_target=True)).sum(-1)
    targets = labels[:, 1:]
    scored = targets != ignore_index
    total = torch.where(scored, per_token, torch.zeros_like(per_token)).sum()
    if hard_weight:
        total = total + hard_weight * F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
            reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / scored.sum().clamp(min=1)
