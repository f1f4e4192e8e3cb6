"""DIL, Direct Imitation Learning (``objectives.md`` §3): preference data as density-ratio
estimation. Hyper-parameter free except the ``dpo`` reading (CPC, §4.5).

``ρ_w = Ā_w − Ā_w^ref``, ``ρ_l = Ā_l − Ā_l^ref`` (length-normalised by default, as the
paper's B.3 and the official code). Paper: ``seeds/dil-imitation-learning-rlhf.txt``.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ._common import (LossOutput, check_choice, check_labels, check_pairs, check_positive,
                      fused_objective, pair_metrics, present_mean, reference_logprobs,
                      sequence_logps, split_pairs)

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
    variant: Literal["lsif", "ukl", "bce", "dpo"] = "lsif",
    average_log_prob: bool = True,
    beta: float = 0.1,
    max_log_ratio: float | None = None,
    **primitive_options,
) -> LossOutput:
    """DIL: a Bregman density-ratio loss on the policy/reference log-ratios of a pair.

    ``lsif``: ``−exp(ρ_w) + ½·exp(2ρ_l)``; ``ukl``: ``−Ā_w + exp(ρ_l)``;
    ``bce``: ``−logσ(ρ_w) − logσ(−ρ_l)``; ``dpo``: ``−logσ(β(ρ_w − ρ_l))``. Mean over pairs.

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H].
        labels (LongTensor): [2B, T] Hugging Face labels.
        ref_logprobs (Tensor, optional): [2B, T] reference log-probs, labels layout.
        ref_hidden, ref_weight, ref_bias (Tensor, optional): the reference head's inputs
            instead. One of the two is required.
        variant (str): a key of ``DIL_LOSSES``. Default: "lsif".
        average_log_prob (bool): length-normalise (``Ā``). Default: True.
        beta (float): > 0, used by ``dpo`` only. Default: 0.1.
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
    check_labels(hidden, labels)
    check_pairs(labels)
    check_choice("variant", variant, DIL_LOSSES)
    check_positive("beta", beta)
    if max_log_ratio is not None and (isinstance(max_log_ratio, bool)
                                      or not isinstance(max_log_ratio, (int, float))):
        raise ValueError(f"max_log_ratio must be None or a number, got {max_log_ratio!r}")
    ref = reference_logprobs(labels, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias, **primitive_options)

    def log_ratios(stats):  # policy Ā (or S) [2B] and ρ [2B], before any clamp
        policy = sequence_logps(stats.out.logprobs, stats.mask, average_log_prob)
        return policy, policy - sequence_logps(ref.to(policy.dtype), stats.mask,
                                               average_log_prob)

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
        metrics["density_ratio/clamped"] = (rho.detach() > max_log_ratio).to(rho.dtype).mean()
        rho = clamped(rho)
    rho_w, rho_l = split_pairs(rho)
    logps_w, logps_l = split_pairs(policy)
    scale = beta if variant == "dpo" else 1.0
    metrics = {**pair_metrics(scale * rho_w, scale * rho_l, logps_w, logps_l, stats),
               "density_ratio/chosen": torch.exp(rho_w.detach()).mean(),
               "density_ratio/rejected": torch.exp(rho_l.detach()).mean(), **metrics}
    return LossOutput(loss, metrics)
