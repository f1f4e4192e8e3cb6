"""Reference-free preference objectives (``objectives.md`` §2): SimPO, ORPO, CPO.

Rows ``[:B]`` are chosen, ``[B:]`` rejected; no reference model. ``S`` is a summed and ``Ā``
a length-normalised sequence log-prob; ``NLL_w`` is the token-mean NLL of the chosen rows.
As everywhere, ``return_argmax=True`` / ``return_entropy=True`` among the primitive options
add the ``mean_token_accuracy`` / ``entropy`` metrics (over all scored tokens).

Hyper-parameter names: ours follow the papers; TRL's and Liger's names are accepted as
aliases where they differ (ORPO's λ ``lam`` is their ``beta``, SimPO's margin ``gamma`` is
TRL's ``simpo_gamma``, CPO's NLL weight ``alpha`` is TRL's ``cpo_alpha``; TRL's CPO ``alpha``
is AlphaPO's reward exponent, which is not implemented here).

Shifting, as in every objective: ``labels`` are Hugging Face labels aligned with
``input_ids``; the loss shifts them itself (``hidden[:, t]`` predicts ``labels[:, t+1]``).
The primitive :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (NLL_LOSS, LossOutput, batch_mean, check_bool, check_call,
                      check_positive, check_range, chosen_nll, fused_objective, log1mexp,
                      pair_metrics, present_mean, resolve_alias, sequence_logps, split_pairs)


def _pair_loss(hidden, weight, labels, average, pair_loss, primitive_options, nll_weight=0.0):
    """(loss, stats, Ā or S of the chosen [B], of the rejected [B]) in one fused pass
    (gradients in forward by default): the mean over pairs of ``pair_loss(logps_w, logps_l)``,
    plus ``nll_weight · NLL_w`` (linear in the log-probs: absent rows add nothing)."""

    def loss_from(stats, present):
        logps = split_pairs(sequence_logps(stats.out.logprobs, stats.mask, average))
        loss = present_mean(pair_loss(*logps), present)
        return loss + nll_weight * chosen_nll(stats) if nll_weight else loss

    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="pair", return_logits_mean=True)
    return (loss, stats, *split_pairs(sequence_logps(stats.out.logprobs, stats.mask, average)))


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1−ε)·logσ(x) − ε·logσ(−x)``."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def simpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    simpo_gamma: float | None = None,
    **primitive_options,
) -> LossOutput:
    """SimPO: ``−logσ(β·(Ā_w − Ā_l) − γ)``, smoothed by ε as conservative DPO is.

    γ is the absolute target margin of the paper's Eq. 6 and TRL's ``simpo_gamma``; the
    official SimPO code is configured by the ratio ``gamma_beta_ratio`` = γ/β instead (its
    recipes' 0.5 with β = 2.0 is γ = 1.0 here).

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H].
        labels (LongTensor): [2B, T] Hugging Face labels.
        beta (float): > 0, reward scale β. Default: 2.0.
        gamma (float): the target reward margin γ, absolute (γ/β = 0.25 by default).
            Default: 0.5.
        label_smoothing (float): ε in [0, 0.5). Default: 0.0.
        simpo_gamma (float, optional): TRL's name for ``gamma``. Default: None.
        **primitive_options: passed to :func:`linear_logprobs`.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; ``rewards/*`` are ``β·Ā``; ``logps/*`` are ``Ā``; ``logits/*``.

    Paper: Meng et al. 2024, "SimPO", §2.2 Eq. 6.
    """
    check_call(simpo_loss, hidden, labels, primitive_options, pairs=True)
    gamma = resolve_alias("simpo_loss", "gamma", gamma, 0.5, "simpo_gamma", simpo_gamma)
    check_positive("beta", beta)
    check_range("simpo_gamma" if simpo_gamma is not None else "gamma", gamma,
                -math.inf, math.inf)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    loss, stats, logps_w, logps_l = _pair_loss(
        hidden, weight, labels, True,
        lambda w, l: _smoothed(beta * (w - l) - gamma, label_smoothing), primitive_options)
    return LossOutput(loss, pair_metrics(beta * logps_w, beta * logps_l, logps_w, logps_l,
                                         stats))


def orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 0.1,
    beta: float | None = None,
    **primitive_options,
) -> LossOutput:
    """ORPO: ``NLL_w − λ·logσ(LO)``, ``LO = (Ā_w − Ā_l) − (log1mexp(Ā_w) − log1mexp(Ā_l))``.

    ``log1mexp(Ā) = log(1 − e^Ā)``, the log-odds' denominator, computed stably (Ā is clamped
    just below 0 so a sequence of certain tokens gives a large finite value, not inf).

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H].
        labels (LongTensor): [2B, T] Hugging Face labels.
        lam (float): > 0, weight λ of the odds-ratio term. Default: 0.1.
        beta (float, optional): TRL's and Liger's name for ``lam``. Default: None.
        **primitive_options: passed to :func:`linear_logprobs`.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; ``rewards/*`` are ``λ·Ā`` (as TRL logs them), ``logps/*``,
        ``logits/*``, ``nll_loss``, ``log_odds_ratio`` (mean logσ(LO)), ``log_odds_chosen``
        (mean LO).

    Paper: Hong et al. 2024, "ORPO", §4 Eq. 6-7.
    """
    check_call(orpo_loss, hidden, labels, primitive_options, pairs=True)
    lam = resolve_alias("orpo_loss", "lam", lam, 0.1, "beta", beta)
    check_positive("beta" if beta is not None else "lam", lam)

    def log_odds_ratio(w, l):  # LO [B]
        tiny = torch.finfo(w.dtype).tiny
        return (w - l) - (log1mexp((-w).clamp_min(tiny)) - log1mexp((-l).clamp_min(tiny)))

    loss, stats, logps_w, logps_l = _pair_loss(
        hidden, weight, labels, True, lambda w, l: -lam * F.logsigmoid(log_odds_ratio(w, l)),
        primitive_options, nll_weight=1.0)
    log_odds = log_odds_ratio(logps_w, logps_l)
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(stats)
    metrics = pair_metrics(lam * logps_w, lam * logps_l, logps_w, logps_l, stats)
    metrics.update({NLL_LOSS: nll.detach(), "log_odds_ratio": batch_mean(ratio.detach()),
                    "log_odds_chosen": batch_mean(log_odds.detach())})
    return LossOutput(loss, metrics)


def cpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    cpo_alpha: float | None = None,
    **primitive_options,
) -> LossOutput:
    """CPO: ``−logσ(β·(S_w − S_l)) + α·NLL_w`` (ε-smoothed like conservative DPO).

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H].
        labels (LongTensor): [2B, T] Hugging Face labels.
        beta (float): > 0, scale of the preference term. Default: 0.1.
        alpha (float): >= 0, weight of the chosen rows' NLL (behaviour cloning; Liger's
            ``alpha``). Default: 1.0.
        label_smoothing (float): ε in [0, 0.5). Default: 0.0.
        average_log_prob (bool): use ``Ā`` instead of ``S``. Default: False.
        cpo_alpha (float, optional): TRL's name for ``alpha`` (TRL's own ``alpha`` is
            AlphaPO's, not implemented). Default: None.
        **primitive_options: passed to :func:`linear_logprobs`.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; ``rewards/*`` are ``β·S`` (as TRL logs them), ``logps/*``,
        ``logits/*``, ``nll_loss``.

    Paper: Xu et al. 2024, "Contrastive Preference Optimization", §3 Eq. 3-4.
    """
    check_call(cpo_loss, hidden, labels, primitive_options, pairs=True)
    alpha = resolve_alias("cpo_loss", "alpha", alpha, 1.0, "cpo_alpha", cpo_alpha)
    check_positive("beta", beta)
    check_range("cpo_alpha" if cpo_alpha is not None else "alpha", alpha, 0.0, math.inf)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    check_bool("average_log_prob", average_log_prob)
    loss, stats, logps_w, logps_l = _pair_loss(
        hidden, weight, labels, average_log_prob,
        lambda w, l: _smoothed(beta * (w - l), label_smoothing), primitive_options,
        nll_weight=alpha)
    nll = chosen_nll(stats)
    metrics = pair_metrics(beta * logps_w, beta * logps_l, logps_w, logps_l, stats)
    metrics[NLL_LOSS] = nll.detach()
    return LossOutput(loss, metrics)
