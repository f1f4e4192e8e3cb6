"""f-divergence SFT (``objectives.md`` §1): SFT as implicit-reward learning.

The implicit reward of a token is ``u_t = β·(ρ_t + sg(lse_0 − lse_t))`` with
``ρ_t = logp_t − ref_t`` and the soft values ``V(s) = lse``; the loss maximises
``φ_f(u) = −f*(−u)``. ``total_variation`` (``φ(u) = u``) is plain SFT.
Paper: ``seeds/implicit-reward-sft-dpo-fdivergence.txt``, §3.2, Table 2, Appendix C Table 4.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

from ._common import (LossOutput, check_choice, check_labels, check_positive, log1mexp,
                      fused_objective, masked_mean, reference_logprobs, shift_targets,
                      token_metrics)

_LOG2 = math.log(2.0)


class Divergence(NamedTuple):
    """``phi`` (φ on its domain), its derivative and the guard's cut-off ``u_c``."""

    phi: Callable[[torch.Tensor], torch.Tensor]
    dphi: Callable[[torch.Tensor], torch.Tensor]
    cutoff: Callable[[float, float], float | None]  # (eps, max_weight) -> u_c or None


DIVERGENCES: dict[str, Divergence] = {
    "total_variation": Divergence(lambda u: u, torch.ones_like, lambda e, w: None),
    "pearson_chi2": Divergence(lambda u: u - u.square() / 4, lambda u: 1 - u / 2,
                               lambda e, w: None),
    "squared_hellinger": Divergence(lambda u: u / (1 + u), lambda u: (1 + u).pow(-2),
                                    lambda e, w: -1.0 + e),
    # f*(t) = exp(t-1); the table's printed row does not follow from f*, this does.
    "kl": Divergence(lambda u: -torch.exp(-u - 1), lambda u: torch.exp(-u - 1),
                     lambda e, w: -1.0 - math.log(w)),  # caps the weight exp(-u-1) at w
    "reverse_kl": Divergence(lambda u: 1 + torch.log(u), lambda u: 1 / u, lambda e, w: e),
    "jensen_shannon": Divergence(lambda u: _LOG2 + log1mexp(u + _LOG2),
                                 lambda u: 1 / (2 * torch.exp(u) - 1),
                                 lambda e, w: -_LOG2 + e),
    "gan": Divergence(log1mexp, lambda u: 1 / torch.expm1(u), lambda e, w: e),
}
VALUE_MODES = ("token", "sequence")


def phi_safe(divergence: str, u: torch.Tensor, *, eps: float = 0.1,
             max_weight: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``φ_f(u)``, continued below the cut-off ``u_c`` by its tangent (C¹, finite for any u).

    Returns ``(φ_safe(u), guarded)`` where ``guarded`` is a bool mask of ``u < u_c``.
    ``u_c`` is ``−1+eps`` (Hellinger), ``eps`` (reverse KL, GAN), ``−log 2 + eps`` (JS), and
    ``−1 − log(max_weight)`` for KL, i.e. the weight ``exp(−u−1)`` never exceeds ``max_weight``.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    spec = DIVERGENCES[divergence]
    cut = spec.cutoff(eps, max_weight)
    if cut is None:
        return spec.phi(u), torch.zeros_like(u, dtype=torch.bool)
    c = torch.tensor(cut, dtype=u.dtype, device=u.device)
    inside = spec.phi(torch.maximum(u, c))  # never evaluated outside the domain: no NaN grads
    tangent = spec.phi(c) + spec.dphi(c) * (u - c)
    guarded = u < c
    return torch.where(guarded, tangent, inside), guarded


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    divergence: Literal["total_variation", "pearson_chi2", "squared_hellinger", "kl",
                        "reverse_kl", "jensen_shannon", "gan"] = "total_variation",
    beta: float = 1.0,
    value_mode: Literal["token", "sequence"] = "token",
    value_grad: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    eps: float = 0.1,
    max_weight: float = 10.0,
    **primitive_options,
) -> LossOutput:
    """f-divergence SFT: ``loss = −Σ_t m_t φ_f(u_t) / Σ_t m_t`` on the fused LM head.

    ``value_mode="token"``: ``u_t = β·(ρ_t + sg(lse_0 − lse_t))`` per scored token, where
    ``lse_0`` is the log-sum-exp of the logits predicting the sequence's first scored token.
    ``value_mode="sequence"``: ``u = β·(Σ_t m_t ρ_t + sg(lse_0 − lse_T))`` per sequence with
    ``lse_T`` at the hidden position of the last scored token (its shifted target is given a
    dummy id so the primitive returns that lse; its log-prob is masked out); the loss is the
    mean of ``−φ(u)`` over sequences that have a scored token.
    ``total_variation`` is linear, so its constant terms (the reference, the detached values)
    are dropped: with β = 1 the loss is ``F.cross_entropy`` on the shifted logits, in value
    and gradient, and it needs no reference. For the other divergences φ is taken through
    :func:`phi_safe` (finite for any ``u``).

    Args:
        hidden (Tensor): [B, T, H] final hidden states (unshifted; never copied).
        weight (Tensor): [V, H] LM-head weight.
        labels (LongTensor): [B, T] Hugging Face labels, ``-100`` on prompt/padding.
        ref_logprobs (Tensor, optional): [B, T] reference log-probs in the labels' layout
            (column 0 is 0), e.g. from :func:`token_logprobs`. Default: None.
        ref_hidden, ref_weight, ref_bias (Tensor, optional): the reference's [B, T, H] hidden
            states and [V, H] head (and [V] bias) instead of ``ref_logprobs``. Default: None.
        divergence (str): one of ``DIVERGENCES``. Default: "total_variation".
        beta (float): > 0, the reward scale β. Default: 1.0 (the table's rows are exact).
        value_mode (str): ``"token"`` or ``"sequence"``. Default: "token".
        value_grad (bool): let the gradient flow through ``lse_0 − lse_t`` (the paper treats
            it as a constant). Default: False.
        num_items_in_batch (int or Tensor, optional): divide the summed loss by this count
            (tokens in token mode, sequences in sequence mode) instead of this batch's own,
            for gradient accumulation. Default: None.
        eps (float): > 0, distance of the guard's cut-off from the singular point (Hellinger,
            reverse KL, JS, GAN). Default: 0.1.
        max_weight (float): > 0, cap on KL's token weight ``exp(−u−1)``. Default: 10.0.
        **primitive_options: passed to :func:`linear_logprobs` (``bias``, ``backend``,
            ``temperature``, ``softcap``, ``ignore_index``, ``chunk_size``, ...).
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: scalar loss; metrics ``nll`` (token-mean NLL), ``u/mean``,
        ``guard/fraction`` (share of terms on the guard's linear extension), and
        ``mean_token_accuracy`` / ``entropy`` when ``return_argmax`` / ``return_entropy``
        is passed.

    Paper: implicit-reward-sft-dpo-fdivergence §3.2 (Eq. for ``u``), Table 2, App. C Table 4.
    """
    check_labels(hidden, labels)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("value_mode", value_mode, VALUE_MODES)
    check_positive("beta", beta)
    check_positive("eps", eps)
    check_positive("max_weight", max_weight)
    linear = divergence == "total_variation"
    ref = reference_logprobs(labels, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias, required=not linear,
                             **primitive_options)
    needs_values = value_grad or not linear  # the lse terms are constants of a linear φ
    sequence = value_mode == "sequence"
    ignore_index = primitive_options.get("ignore_index", -100)
    targets = shift_targets(labels, ignore_index)
    scored = targets != ignore_index
    has_any = scored.any(-1)
    columns = torch.arange(labels.shape[1], device=labels.device)
    first = torch.where(scored, columns, labels.shape[1]).amin(-1).clamp_max(labels.shape[1] - 1)
    last = torch.where(scored, columns, -1).amax(-1)
    end = (last + 1).clamp_min(0)  # hidden position of the last scored label: s_T
    if sequence and needs_values:  # a dummy target there so the primitive returns lse_T
        at_end = (columns == end.unsqueeze(-1)) & has_any.unsqueeze(-1)
        targets = torch.where(at_end, torch.zeros_like(targets), targets)
    weights = has_any if sequence else scored  # which terms count: sequences or tokens
    divisor = weights.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch

    def terms(stats):  # u, φ_safe(u) and the guard mask, per token [B, T] or sequence [B]
        logp, mask = stats.out.logprobs, stats.mask
        rho = logp if linear else logp - ref.to(logp.dtype)
        values = None
        if needs_values:
            lse = stats.out.lse if value_grad else stats.out.lse.detach()
            lse_0 = lse.gather(1, first.unsqueeze(-1))  # [B, 1]
            values = lse_0 - (lse.gather(1, end.unsqueeze(-1)) if sequence else lse)
        if sequence:
            u = beta * ((rho * mask).sum(-1) + (values.squeeze(-1) if values is not None else 0))
        else:
            u = beta * (rho + values if values is not None else rho)
        return (u, *phi_safe(divergence, u, eps=eps, max_weight=max_weight))

    def loss_from(stats, present):  # groups are sequences: lse_0 is another token's
        _, phi, _ = terms(stats)
        counted = weights & (present if sequence else present.unsqueeze(-1))
        return -torch.where(counted, phi, torch.zeros_like(phi)).sum() / divisor

    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="sequence", targets=targets, return_lse=needs_values)
    u, _, guarded = terms(stats)
    share = weights.to(u.dtype)
    metrics = {
        "nll": -masked_mean(stats.out.logprobs.detach(), stats.mask),
        "u/mean": masked_mean(u.detach(), share),
        "guard/fraction": masked_mean(guarded.to(u.dtype), share),
        **token_metrics(stats),
    }
    return LossOutput(loss, metrics)
