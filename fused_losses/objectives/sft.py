"""f-divergence SFT (``objectives.md`` §1): SFT as implicit-reward learning.

The implicit reward of a response (Lemma 1, Eq. 5) is ``u = β·(Σ_t ρ_t + sg(V(s_0) − V(s_T)))``
with ``ρ_t = logp_t − ref_t`` and the soft values ``V(s) = lse``; the loss maximises
``φ_f(u) = −f*(−u)``. ``total_variation`` (``φ(u) = u``) is plain SFT.
Paper: ``seeds/implicit-reward-sft-dpo-fdivergence.txt``, §3.2 Lemma 1 and Eq. 5, Table 2,
Appendix C Table 4.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

from ._common import (LossOutput, check_bool, check_call, check_choice, check_count,
                      check_positive, fused_objective, log1mexp, masked, masked_mean,
                      reference_logprobs, shift_targets, token_metrics)

_LOG2 = math.log(2.0)


class Divergence(NamedTuple):
    """``phi`` (φ on its domain), its derivative ``dphi`` (the token's weight relative to
    the NLL's) and the guard's cut-off ``u_c`` where ``dphi(u_c) = max_weight``."""

    phi: Callable[[torch.Tensor], torch.Tensor]
    dphi: Callable[[torch.Tensor], torch.Tensor]
    cutoff: Callable[[float], float | None]  # max_weight -> u_c, or None (weight bounded)


DIVERGENCES: dict[str, Divergence] = {
    "total_variation": Divergence(lambda u: u, torch.ones_like, lambda w: None),
    "pearson_chi2": Divergence(lambda u: u - u.square() / 4, lambda u: 1 - u / 2,
                               lambda w: None),
    # φ' = (1+u)^-2 = w at u = -1 + w^(-1/2)
    "squared_hellinger": Divergence(lambda u: u / (1 + u), lambda u: (1 + u).pow(-2),
                                    lambda w: -1.0 + w ** -0.5),
    # f*(t) = exp(t-1); the table's printed row does not follow from f*, this does.
    # φ' = exp(-u-1) = w at u = -1 - log w
    "kl": Divergence(lambda u: -torch.exp(-u - 1), lambda u: torch.exp(-u - 1),
                     lambda w: -1.0 - math.log(w)),
    # φ' = 1/u = w at u = 1/w
    "reverse_kl": Divergence(lambda u: 1 + torch.log(u), lambda u: 1 / u, lambda w: 1.0 / w),
    # log(2 - e^-u) = log 2 + log1mexp(u + log 2); φ' = 1/(2e^u - 1) = w at u = log((1+1/w)/2)
    "jensen_shannon": Divergence(lambda u: _LOG2 + log1mexp(u + _LOG2),
                                 lambda u: 1 / (2 * torch.exp(u) - 1),
                                 lambda w: math.log((1 + 1 / w) / 2)),
    # log(1 - e^-u) = log1mexp(u); φ' = 1/(e^u - 1) = w at u = log(1 + 1/w)
    "gan": Divergence(log1mexp, lambda u: 1 / torch.expm1(u), lambda w: math.log1p(1 / w)),
}
VALUE_MODES = ("sequence", "token")


def phi_safe(divergence: str, u: torch.Tensor, *,
             max_weight: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``φ_f(u)``, continued below the cut-off ``u_c`` by its tangent (C¹, finite for any u).

    ``u_c`` is where ``φ'(u_c) = max_weight``, so no term's weight exceeds ``max_weight``
    times the NLL's: ``−1 + max_weight^(−1/2)`` (squared Hellinger), ``1/max_weight``
    (reverse KL), ``log((1 + 1/max_weight)/2)`` (JS), ``log(1 + 1/max_weight)`` (GAN),
    ``−1 − log max_weight`` (KL). Total variation and Pearson χ² are used as they are.

    Args:
        divergence (str): a key of ``DIVERGENCES``.
        u (Tensor): implicit rewards, any shape, floating.
        max_weight (float): > 0, the largest weight ``φ'(u)`` any term gets. Default: 10.0.

    Returns:
        (Tensor, BoolTensor): ``φ_safe(u)`` and the mask of ``u < u_c`` (on the tangent).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_positive("max_weight", max_weight)
    spec = DIVERGENCES[divergence]
    cut = spec.cutoff(max_weight)
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
    value_mode: Literal["sequence", "token"] = "sequence",
    value_grad: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    max_weight: float = 10.0,
    **primitive_options,
) -> LossOutput:
    """f-divergence SFT on the fused LM head: ``loss = −Σ φ_f(u) / (number of scored tokens)``.

    ``value_mode="sequence"`` (default; the paper's Eq. 5, Tables 2 and 4): one term per
    sequence, ``u = β·(Σ_t m_t ρ_t + sg(lse(s_0) − lse(s_T)))``.
    ``value_mode="token"`` (Lemma 1 applied to each step): one term per scored token,
    ``u_t = β·(ρ_t + sg(lse(s_t) − lse(s_{t+1})))``; on a response without holes the
    per-token rewards telescope to the sequence reward.

    ``lse(s_t)`` is the log-sum-exp of the logits at state ``s_t`` = prompt ⊕ y_<t, i.e. of
    the logits that predict ``y_t``. In the Hugging Face layout ``lse(s_0)`` is at the hidden
    position before the first scored label, and ``lse(s_{t+1})`` at the hidden position of
    ``y_t`` itself (for the last scored token that is the terminal state ``s_T``); where that
    position's own target is ignored, the loss gives it a dummy target so the primitive
    returns its lse, and masks the dummy's log-prob out.

    Both modes divide by the number of scored tokens (as Hugging Face and TRL normalise SFT),
    so ``total_variation`` with β = 1 is ``F.cross_entropy`` on the shifted logits, in value
    and gradient, in either mode (and needs no reference: its constant terms are dropped).
    ``num_items_in_batch`` replaces the divisor (e.g. the number of sequences, for the
    paper's expectation over sequences). The other divergences take φ through
    :func:`phi_safe`: below the cut-off where ``φ'(u) = max_weight``, φ is its tangent.
    They are f-divergences of the implicit reward of the target tokens (``kl`` and
    ``jensen_shannon`` included), not distillation to a reference's whole next-token
    distribution: for that, see :func:`~fused_losses.distill_loss`.

    Shifting: ``labels`` are Hugging Face labels aligned with ``input_ids``; the loss shifts
    them itself (``hidden[:, t]`` predicts ``labels[:, t+1]``). The primitive
    :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.

    Args:
        hidden (Tensor): [B, T, H] final hidden states (unshifted; never copied).
        weight (Tensor): [V, H] LM-head weight.
        labels (LongTensor): [B, T] Hugging Face labels, ``-100`` on prompt/padding.
        ref_logprobs (Tensor, optional): [B, T] reference log-probs in the labels' layout
            (column 0 is 0), e.g. from :func:`token_logprobs`; read only where ``labels`` is
            scored. Default: None.
        ref_hidden, ref_weight, ref_bias (Tensor, optional): the reference's [B, T, H] hidden
            states and [V, H] head (and [V] bias) instead of ``ref_logprobs``. Default: None.
        divergence (str): one of ``DIVERGENCES``. Default: "total_variation".
        beta (float): > 0, the reward scale β. Default: 1.0 (the table's rows are exact).
        value_mode (str): ``"sequence"`` or ``"token"``. Default: "sequence".
        value_grad (bool): let the gradient flow through the value difference (the paper
            treats it as a constant). Default: False.
        num_items_in_batch (int or Tensor, optional): > 0; divide the summed loss by this
            count instead of this batch's scored tokens (gradient accumulation: the whole
            step's scored tokens). Default: None.
        max_weight (float): > 0, the largest weight ``φ'(u)`` a term gets (the guard's
            cut-off, see :func:`phi_safe`). Default: 10.0.
        **primitive_options: passed to :func:`linear_logprobs` (``bias``, ``backend``,
            ``temperature``, ``softcap``, ``ignore_index``, ``chunk_size``, ...).
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: scalar loss; metrics ``nll`` (token-mean NLL), ``u/mean`` (over the
        terms: sequences or tokens), ``guard/fraction`` (share of terms on the guard's
        tangent), and ``mean_token_accuracy`` / ``entropy`` when ``return_argmax`` /
        ``return_entropy`` is passed.

    Paper: implicit-reward-sft-dpo-fdivergence §3.2 (Lemma 1, Eq. 5), Table 2, App. C Table 4.
    """
    check_call(sft_loss, hidden, labels, primitive_options)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("value_mode", value_mode, VALUE_MODES)
    check_positive("beta", beta)
    check_bool("value_grad", value_grad)
    check_count("num_items_in_batch", num_items_in_batch)
    check_positive("max_weight", max_weight)
    linear = divergence == "total_variation"
    ref = reference_logprobs(labels, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias, required=not linear,
                             **primitive_options)
    sequence = value_mode == "sequence"
    ignore_index = primitive_options.get("ignore_index", -100)
    targets = shift_targets(labels, ignore_index)
    scored = targets != ignore_index  # prediction layout: column j scores labels[:, j+1]
    has_any = scored.any(-1)
    length = labels.shape[1]
    # the lse terms are constants of a linear φ (and there are none without positions)
    needs_values = (value_grad or not linear) and length > 0
    # first and last scored columns ([B, 1]); a column past the end keeps the reductions
    # off an empty dimension
    columns = torch.arange(length + 1, device=labels.device)
    padded = torch.nn.functional.pad(scored, (0, 1))
    first = torch.where(padded, columns, length).amin(-1, keepdim=True) \
        .clamp_max(max(length - 1, 0))
    last = torch.where(padded, columns, -1).amax(-1, keepdim=True)
    if needs_values:
        # The lse at the hidden position of a scored label itself, s_{t+1} (s_T for the
        # last): in sequence mode the last scored label's, in token mode every one's. Where
        # that position's own target is ignored it gets a dummy one (id 0) so the primitive
        # returns its lse; its log-prob is masked out (the mask follows the labels).
        if sequence:
            wanted = (columns[:length] == last + 1) & has_any.unsqueeze(-1)
        else:
            wanted = torch.nn.functional.pad(scored[:, :-1], (1, 0))
        targets = torch.where(wanted & ~scored, torch.zeros_like(targets), targets)
    divisor = scored.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    terms_mask = has_any if sequence else scored  # one term per sequence, or per token

    def terms(stats):  # u, φ_safe(u) and the guard mask: [B] (sequence) or [B, T] (token)
        logp, mask = stats.out.logprobs, stats.mask
        rho = logp if linear else logp - ref.to(logp.dtype)
        values = 0.0
        if needs_values:
            lse = stats.out.lse if value_grad else stats.out.lse.detach()
            if sequence:  # lse(s_0) - lse(s_T)
                values = (lse.gather(1, first) - lse.gather(1, (last + 1).clamp_min(0))) \
                    .squeeze(-1)
            else:  # lse(s_t) - lse(s_{t+1})
                values = lse - torch.nn.functional.pad(lse[:, 1:], (0, 1))
        u = beta * ((masked(rho, mask).sum(-1) if sequence else rho) + values)
        return (u, *phi_safe(divergence, u, max_weight=max_weight))

    # With φ(u) = u and no value terms the loss is −β·Σ_t m_t·logp_t / divisor in either
    # mode: a sum over tokens, so chunks of any tokens keep the one-pass path for a sequence
    # of any length. Otherwise a term (a sequence's u, or a token's lse(s_{t+1})) spans
    # positions: chunks of whole sequences.
    token_sum = linear and not needs_values

    def loss_from(stats, present):  # present: [B, T] tokens if token_sum, else [B] rows
        if token_sum:
            return -beta * masked(stats.out.logprobs, scored & present).sum() / divisor
        _, phi, _ = terms(stats)
        counted = terms_mask & (present if sequence else present.unsqueeze(-1))
        return -masked(phi, counted).sum() / divisor

    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="token" if token_sum else "sequence",
                                  targets=targets, return_lse=needs_values)
    u, _, guarded = terms(stats)
    share = terms_mask.to(u.dtype)
    metrics = {
        "nll": -masked_mean(stats.out.logprobs.detach(), stats.mask),
        "u/mean": masked_mean(u.detach(), share),
        "guard/fraction": masked_mean(guarded.to(u.dtype), share),
        **token_metrics(stats),
    }
    return LossOutput(loss, metrics)
