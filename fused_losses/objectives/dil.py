"""DIL, Direct Imitation Learning (``objectives.md`` §3): preference data as density-ratio
estimation. Hyper-parameter free except the ``dpo`` reading (CPC, §4.5).

``ρ_w = Ā_w − Ā_w^ref``, ``ρ_l = Ā_l − Ā_l^ref`` (length-normalised by default, as the
paper's B.3 and the official code). Paper: ``seeds/dil-imitation-learning-rlhf.txt``.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ._common import (LossOutput, batch_mean, check_bool, check_call, check_choice,
                      check_positive, check_range, fused_objective, pair_metrics, present_mean,
                      sequence_logps, sequence_reference, split_pairs)

# (ρ_w, ρ_l, logps_w, β) -> per-pair loss [B]
DILLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

DIL_LOSSES: dict[str, DILLoss] = {
    # LSIF (§4.3 Eq. 21 with the ratio parameterised by the policy, Eq. 24)
    "lsif": lambda w, l, logps_w, beta: -torch.exp(w) + 0.5 * torch.exp(2 * l),
    # UKL / KLIEP: −log r(chosen) + r(rejected); the chosen's reference term is a constant
    "ukl": lambda w, l, logps_w, beta: -logps_w + torch.exp(l),
    # BCE
    "bce": lambda w, l, logps_w, beta: -F.logsigmoid(w) - F.logsigmoid(-l),
    # CPC / InfoNCE with one negative: DPO (§4.5 Eq. 27)
    "dpo": lambda w, l, logps_w, beta: -F.logsigmoid(beta * (w - l)),
}


def dil_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    variant: Literal["lsif", "ukl", "bce", "dpo"] = "lsif",
    average_log_prob: bool = True,
    beta: float = 0.1,
    max_log_ratio: float | None = None,
    **primitive_options,
) -> LossOutput:
    """DIL: a Bregman density-ratio loss on the policy/reference log-ratios of a pair.

    ``lsif``: ``−exp(ρ_w) + ½·exp(2ρ_l)``; ``ukl``: ``−Ā_w + exp(ρ_l)``;
    ``bce``: ``−logσ(ρ_w) − logσ(−ρ_l)``; ``dpo``: ``−logσ(β(ρ_w − ρ_l))``. Mean over pairs.

    Shifting: ``labels`` are Hugging Face labels aligned with ``input_ids``; the loss shifts
    them itself (``hidden[:, t]`` predicts ``labels[:, t+1]``). The primitive
    :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H].
        labels (LongTensor): [2B, T] Hugging Face labels.
        ref_logprobs (Tensor, optional): [2B, T] reference log-probs, labels layout (read
            only where ``labels`` is scored).
        ref_hidden, ref_weight, ref_bias (Tensor, optional): the reference head's inputs
            instead.
        ref_chosen_logps, ref_rejected_logps (Tensor, optional): [B] each, TRL's precomputed
            per-sequence references (summed over each row's scored tokens; divided by the
            count here when ``average_log_prob``). One of the three forms is required.
        variant (str): a key of ``DIL_LOSSES``. Default: "lsif".
        average_log_prob (bool): length-normalise (``Ā``). Default: True.
        beta (float): > 0, used by ``dpo`` only. Default: 0.1 (as DPO's; the official DIL
            recipe for its DPO reading uses 0.01).
        max_log_ratio (float, optional): clamp ``ρ`` from above before the loss (the
            official code has no clamp; ``exp`` can overflow when the policy drifts far). The
            metric ``density_ratio/clamped`` reports the share of clamped ratios.
            Default: None (off).
        **primitive_options: passed to :func:`linear_logprobs`; ``return_argmax`` /
            ``return_entropy`` add the ``mean_token_accuracy`` / ``entropy`` metrics.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; the DPO metrics with rewards ``ρ`` (``β·ρ`` for ``dpo``),
        ``density_ratio/chosen`` = mean ``exp(ρ_w)``, ``density_ratio/rejected``, and
        ``density_ratio/clamped`` when ``max_log_ratio`` is set.

    Paper: "On a Connection Between Imitation Learning and RLHF", §4.3-4.5 (Eq. 21, 24,
    27), App. B.3.
    """
    check_call(dil_loss, hidden, labels, primitive_options, pairs=True)
    check_choice("variant", variant, DIL_LOSSES)
    check_bool("average_log_prob", average_log_prob)
    check_positive("beta", beta)
    if max_log_ratio is not None:
        check_range("max_log_ratio", max_log_ratio, -math.inf, math.inf)
    reference = sequence_reference(
        labels, average=average_log_prob, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, **primitive_options)

    def log_ratios(stats):  # policy Ā (or S) [2B] and ρ [2B], before any clamp
        policy = sequence_logps(stats.out.logprobs, stats.mask, average_log_prob)
        return policy, policy - reference.to(policy.dtype)

    def clamped(rho):
        return rho if max_log_ratio is None else rho.clamp_max(max_log_ratio)

    def loss_from(stats, present):
        policy, rho = log_ratios(stats)
        per_pair = DIL_LOSSES[variant](*split_pairs(clamped(rho)), split_pairs(policy)[0], beta)
        return present_mean(per_pair, present)

    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="pair", return_logits_mean=True)
    policy, rho = log_ratios(stats)
    metrics = {}
    if max_log_ratio is not None:
        metrics["density_ratio/clamped"] = batch_mean((rho.detach() > max_log_ratio)
                                                      .to(rho.dtype))
        rho = clamped(rho)
    rho_w, rho_l = split_pairs(rho)
    logps_w, logps_l = split_pairs(policy)
    scale = beta if variant == "dpo" else 1.0
    metrics = {**pair_metrics(scale * rho_w, scale * rho_l, logps_w, logps_l, stats),
               "density_ratio/chosen": batch_mean(torch.exp(rho_w.detach())),
               "density_ratio/rejected": batch_mean(torch.exp(rho_l.detach())), **metrics}
    return LossOutput(loss, metrics)
