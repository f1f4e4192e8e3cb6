"""Independent naive distillation references: materialised float64 logits of both models, the
divergences written from their definitions (the mixture's log by logsumexp, as TRL GKD forms
it), Python-level loops over nothing. Nothing here imports the package."""
from __future__ import annotations

import math

import torch


def logits_of(hidden, weight, bias=None):
    z = hidden.double() @ weight.double().T
    return z if bias is None else z + bias.double()


def _kl(log_a, log_b):
    """Σ_v a_v (log a_v − log b_v) over the columns where a_v > 0: 0·log 0 = 0 (a masked,
    -inf logit has probability 0), +inf where b_v = 0 < a_v. Both logs are replaced by 0
    outside the support before the product, so autograd's zero there stays zero (a ``where``
    alone would multiply it by the NaN or inf of the unused branch)."""
    keep = log_a > -math.inf
    a = torch.where(keep, log_a, 0.0)
    b = torch.where(keep, log_b, 0.0)
    return torch.where(keep, a.exp() * (a - b), 0.0).sum(-1)


def divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0):
    """Per-position divergence [...] of P = softmax(teacher/τ) and Q = softmax(student/τ)."""
    log_q = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if kind == "jsd" and beta == 0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    # columns that both models mask are out of M's support: logsumexp(-inf, -inf) would
    # give autograd a NaN there
    either = (log_p > -math.inf) | (log_q > -math.inf)
    log_m = torch.logsumexp(torch.stack([torch.where(either, log_p, 0.0) + math.log(beta),
                                         torch.where(either, log_q, 0.0) + math.log(1 - beta)]),
                            0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def logprobs(student_logits, targets, ignore_index=-100):
    """log softmax(z)[y] at temperature 1, 0 where ignored."""
    log_q = torch.log_softmax(student_logits.double(), dim=-1)
    picked = log_q.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != ignore_index, picked, torch.zeros_like(picked))


def per_token(hidden, weight, teacher_hidden, teacher_weight, targets, *, bias=None,
              teacher_bias=None, kind="jsd", beta=0.5, temperature=1.0, ignore_index=-100):
    """(divergence, logprobs), [...] each, 0 where ``targets == ignore_index``."""
    z = logits_of(hidden, weight, bias)
    zt = logits_of(teacher_hidden, teacher_weight, teacher_bias)
    scored = targets != ignore_index
    div = divergence(z, zt, kind, beta, temperature)
    return torch.where(scored, div, torch.zeros_like(div)), logprobs(z, targets, ignore_index)


def distill(hidden, weight, teacher_hidden, teacher_weight, labels, *, bias=None,
            teacher_bias=None, kind="jsd", beta=0.5, temperature=1.0, hard_weight=0.0,
            divisor=None, ignore_index=-100):
    """The distillation objective on [B, T] Hugging Face labels (shifted here)."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    div, logp = per_token(hidden, weight, teacher_hidden, teacher_weight, targets, bias=bias,
                          teacher_bias=teacher_bias, kind=kind, beta=beta,
                          temperature=temperature, ignore_index=ignore_index)
    count = (targets != ignore_index).sum().clamp_min(1) if divisor is None else divisor
    return (div.sum() - hard_weight * logp.sum()) / count
