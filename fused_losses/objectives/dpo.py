"""The DPO family (``objectives.md`` §2): one primitive call, then a per-pair loss from a table.

Rows ``[:B]`` are chosen, ``[B:]`` rejected. ``ρ_w = S_w − S_w^ref``, ``ρ_l = S_l − S_l^ref``
(summed, or length-normalised with ``average_log_prob``), ``h = ρ_w − ρ_l``. Conventions are
TRL's (≤ 0.28) and Liger's. Paper: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ._common import (NLL_LOSS, LossOutput, batch_mean, check_bool, check_call, check_choice,
                      check_positive, check_range, chosen_nll, fused_objective, pair_metrics,
                      present_mean, sequence_logps, sequence_reference, split_pairs)

# Each entry: (ρ_w, ρ_l, β, ε, extra) -> per-pair loss [B]. ``extra`` holds discopop's τ and
# bco_pair's δ. Citations: TRL's DPOTrainer.dpo_loss and the papers it names.
PairLoss = Callable[[torch.Tensor, torch.Tensor, float, float, dict], torch.Tensor]


def _sigmoid(w, l, beta, eps, extra):  # DPO Eq. 7; conservative DPO (Mitchell 2023) with ε
    x = beta * (w - l)
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _robust(w, l, beta, eps, extra):  # Chowdhury et al. 2024, Eq. 9 (unbiased under noise)
    x = beta * (w - l)
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _hinge(w, l, beta, eps, extra):  # SLiC (Zhao et al. 2023)
    return torch.relu(1 - beta * (w - l))


def _ipo(w, l, beta, eps, extra):  # Azar et al. 2023, Eq. 17 (on length-normalised logps)
    return (w - l - 1 / (2 * beta)).square()


def _exo_pair(w, l, beta, eps, extra):  # Ji et al. 2024, Eq. 16 with ε := 1e-3 if 0
    eps = eps or 1e-3
    x = beta * (w - l)
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps)) \
        + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))


def _nca_pair(w, l, beta, eps, extra):  # Chen et al. 2024 (NCA), pairwise form
    return -F.logsigmoid(beta * w) - 0.5 * F.logsigmoid(-beta * w) \
        - 0.5 * F.logsigmoid(-beta * l)


def _bco_pair(w, l, beta, eps, extra):  # Jung et al. 2024 (BCO), δ = running mean reward
    delta = extra["delta"]
    return -F.logsigmoid(beta * w - delta) - F.logsigmoid(-(beta * l - delta))


def _sppo_hard(w, l, beta, eps, extra):  # Wu et al. 2024 (SPPO), hard-label form
    return (w - 1 / (2 * beta)).square() + (l + 1 / (2 * beta)).square()


def _apo_zero(w, l, beta, eps, extra):  # D'Oosterlinck et al. 2024 (APO-zero)
    return (1 - torch.sigmoid(beta * w)) + torch.sigmoid(beta * l)


def _apo_down(w, l, beta, eps, extra):  # D'Oosterlinck et al. 2024 (APO-down)
    return torch.sigmoid(beta * w) + (1 - torch.sigmoid(beta * (w - l)))


def _discopop(w, l, beta, eps, extra):  # Chan et al. 2024 (DiscoPOP, log-ratio modulation)
    x = beta * (w - l)
    blend = torch.sigmoid(x / extra["tau"])
    # σ(x/τ)·e^(−x) as one exponent: finite where e^(−x) alone overflows and σ(x/τ) is 0.
    return -F.logsigmoid(x) * (1 - blend) + torch.exp(F.logsigmoid(x / extra["tau"]) - x)


DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo,
    "exo_pair": _exo_pair, "nca_pair": _nca_pair, "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard, "apo_zero": _apo_zero, "apo_down": _apo_down,
    "discopop": _discopop,
}


def dpo_loss(
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
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair",
                       "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor = 0.0,
    bco_count: float | torch.Tensor = 0,
    bco_process_group=None,
    **primitive_options,
) -> LossOutput:
    """Direct preference optimisation and its relatives, on the fused LM head.

    ``loss = mean_pairs DPO_LOSSES[loss_type](ρ_w, ρ_l) (+ rpo_alpha · NLL_w)``.

    Shifting: ``labels`` are Hugging Face labels aligned with ``input_ids``; the loss shifts
    them itself (``hidden[:, t]`` predicts ``labels[:, t+1]``). The primitive
    :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.

    Args:
        hidden (Tensor): [2B, T, H]; rows [:B] chosen, [B:] rejected.
        weight (Tensor): [V, H] LM-head weight.
        labels (LongTensor): [2B, T] Hugging Face labels (-100 on prompt and padding).
        ref_logprobs (Tensor, optional): [2B, T] reference log-probs, labels layout (read
            only where ``labels`` is scored).
        ref_hidden, ref_weight, ref_bias (Tensor, optional): the reference head's inputs
            instead of ``ref_logprobs`` (computed fused, under no_grad).
        ref_chosen_logps, ref_rejected_logps (Tensor, optional): [B] each, TRL's precomputed
            per-sequence references: the reference's log-probs summed over each row's scored
            tokens (divided by the row's count here where the loss length-normalises).
            One of the three forms is required.
        loss_type (str): a key of ``DPO_LOSSES``. Default: "sigmoid".
        beta (float): > 0. Default: 0.1.
        label_smoothing (float): ε in [0, 0.5) for ``sigmoid``/``robust``/``exo_pair``.
            Default: 0.0.
        average_log_prob (bool): length-normalise the sequence log-probs (``ipo`` always
            does, as TRL does). Default: False.
        rpo_alpha (float, optional): >= 0; add ``rpo_alpha`` × token-mean NLL of the chosen
            rows (RPO, Pang et al. 2024). Default: None.
        discopop_tau (float): > 0, DiscoPOP's τ. Default: 0.05.
        bco_delta (float or Tensor): ``bco_pair``'s running mean reward δ before this batch.
            Default: 0.0.
        bco_count (float or Tensor): >= 0, how many batch means ``bco_delta`` averages; this
            batch's mean reward is folded in, ``δ = (count·δ + mean r) / (count + 1)``, as
            TRL's (≤ 0.28) ``RunningMoments`` does. :class:`FusedDPOLoss` keeps both.
            Default: 0.
        bco_process_group (ProcessGroup, optional): under data parallelism, the group whose
            ranks' batch means are folded in together (TRL gathers them): δ becomes
            ``(count·δ + Σ_ranks mean r) / (count + world)`` on every rank and the
            ``bco/count`` metric grows by the group's size. Default: None (this batch only).
        **primitive_options: passed to :func:`linear_logprobs`; ``return_argmax`` /
            ``return_entropy`` add the ``mean_token_accuracy`` / ``entropy`` metrics.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss (0 for an empty batch); metrics
        ``rewards/{chosen,rejected,accuracies,margins}`` (rewards ``β·ρ``),
        ``logps/{chosen,rejected}``, ``logits/{chosen,rejected}``, ``nll_loss`` (with
        ``rpo_alpha``), ``bco/delta`` and ``bco/count`` (with ``bco_pair``: the running
        mean and count after this batch).

    Paper: Rafailov et al. 2023, §4 Eq. 7; the variants as cited beside ``DPO_LOSSES``.
    """
    check_call(dpo_loss, hidden, labels, primitive_options, pairs=True)
    check_choice("loss_type", loss_type, DPO_LOSSES)
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    check_bool("average_log_prob", average_log_prob)
    check_positive("discopop_tau", discopop_tau)
    if rpo_alpha is not None:
        check_range("rpo_alpha", rpo_alpha, 0.0, math.inf)
    if loss_type == "bco_pair":
        check_running_mean(bco_delta, bco_count)
    average = average_log_prob or loss_type == "ipo"
    reference = sequence_reference(
        labels, average=average, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, **primitive_options)
    extra = {"tau": discopop_tau}

    def terms(stats):  # policy sequence log-probs [2B]; ρ_w, ρ_l [B]
        policy = sequence_logps(stats.out.logprobs, stats.mask, average)
        return (policy, *split_pairs(policy - reference.to(policy.dtype)))

    def loss_from(stats, present):
        _, rho_w, rho_l = terms(stats)
        if loss_type == "bco_pair":  # one call: bco_pair is never chunked (not additive)
            extra["delta"], extra["count"] = _running_delta(
                beta * torch.cat((rho_w, rho_l)).detach(), bco_delta, bco_count,
                bco_process_group)
        loss = present_mean(DPO_LOSSES[loss_type](rho_w, rho_l, beta, label_smoothing, extra),
                            present)
        return loss if rpo_alpha is None else loss + rpo_alpha * chosen_nll(stats)

    # bco_pair's δ is a mean over the whole batch: not a sum of per-pair terms.
    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="pair", additive=loss_type != "bco_pair",
                                  return_logits_mean=True)
    policy, rho_w, rho_l = terms(stats)
    metrics = {}
    if loss_type == "bco_pair":
        metrics["bco/delta"] = extra["delta"].detach()
        metrics["bco/count"] = extra["count"].detach()
    if rpo_alpha is not None:
        metrics[NLL_LOSS] = chosen_nll(stats).detach()
    logps_w, logps_l = split_pairs(policy)
    metrics = {**pair_metrics(beta * rho_w, beta * rho_l, logps_w, logps_l, stats), **metrics}
    return LossOutput(loss, metrics)


def check_running_mean(delta, count) -> None:
    """``bco_delta`` (finite) and ``bco_count`` (>= 0): numbers or one-element tensors."""
    for name, value, low in (("bco_delta", delta, -math.inf), ("bco_count", count, 0.0)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (
                    torch.int32, torch.int64)):
                raise ValueError(f"{name} must be a number or a one-element real tensor, got "
                                 f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}")
        else:
            check_range(name, value, low, math.inf)


def _running_delta(rewards: torch.Tensor, delta, count, group):
    """(δ, count) after folding this batch's mean reward (every rank's, with a ``group``)
    into the running mean ``delta`` of ``count`` batch means; detached, as TRL's."""
    batch_sum, batches = batch_mean(rewards), 1
    if group is not None:
        import torch.distributed as dist

        batch_sum = batch_sum.clone()
        dist.all_reduce(batch_sum, op=dist.ReduceOp.SUM, group=group)
        batches = dist.get_world_size(group)
    count = torch.as_tensor(count, dtype=rewards.dtype, device=rewards.device)
    delta = torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device)
    return (count * delta + batch_sum) / (count + batches), count + batches
