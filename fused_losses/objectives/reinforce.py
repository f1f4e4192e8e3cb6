"""Dense-Path REINFORCE and its token rewards (``objectives.md`` §5).

The SFT model's log-probs against an earlier SFT checkpoint's are a dense, baseline-relative
token reward ``r̂_t = logp_t^SFT − logp_t^ref`` (Eq. 5); the policy is trained by REINFORCE
on the returns of those rewards. Paper: ``seeds/dense-path-reinforce.txt`` §4.3, Algorithm 1.
"""
from __future__ import annotations

import torch

from ._common import (LossOutput, check_bool, check_call, check_options, check_per_token,
                      check_range, discounted_suffix_sum, fused_objective, masked,
                      masked_mean, reference_logprobs, to_prediction_layout, token_metrics)
from .logprobs import token_logprobs

KL_CLAMP = 10.0  # |k1| is clamped to this before the penalty


@torch.no_grad()
def token_rewards(
    sft_model: torch.nn.Module,
    ref_model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **primitive_options,
) -> torch.Tensor:
    """Dense token rewards ``r̂_t = log π_SFT(y_t | s_t) − log π_ref(y_t | s_t)`` (Eq. 5).

    Both models run fused and under ``no_grad``; ``ref_model`` is the SFT checkpoint at about
    half the training steps. See :func:`render_token_rewards` to look at the credit assignment.

    Args:
        sft_model, ref_model (nn.Module): Hugging Face causal LMs with the same vocabulary.
        input_ids (LongTensor): [B, T].
        labels (LongTensor): [B, T] Hugging Face labels; only scored positions get a reward.
        attention_mask (Tensor, optional): [B, T]. Default: None.
        **primitive_options: passed to :func:`linear_logprobs`.

    Returns:
        Tensor: [B, T] float32 in the labels' layout (0 where ignored and in column 0), ready
        for :func:`reinforce_loss`'s ``rewards``.

    Paper: dense-path-reinforce §4.3 Eq. 5 and Figure 1.
    """
    check_options("token_rewards", primitive_options)
    args = (input_ids, labels, attention_mask)
    return token_logprobs(sft_model, *args, **primitive_options) \
        - token_logprobs(ref_model, *args, **primitive_options)


def reinforce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    rewards: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool = False,
    kl_coef: float = 0.0,
    init_logprobs: torch.Tensor | None = None,
    init_hidden: torch.Tensor | None = None,
    init_weight: torch.Tensor | None = None,
    init_bias: torch.Tensor | None = None,
    **primitive_options,
) -> LossOutput:
    """Dense-Path REINFORCE: ``L = −(1/B)·Σ_i Σ_t m_t·logp_t·G_t``.

    ``G_t = Σ_{k≥t} γ^{k−t}·r_k`` over raw positions, with ``r_k = r̂_k − kl_coef·k1_k``
    when ``kl_coef > 0`` (``k1 = clamp(logp − logp_init, ±10)``, detached: the penalty is
    folded into the reward before the return). ``G`` is a constant for the gradient;
    ``whiten`` standardises it over the batch's scored tokens.

    Defaults: γ = 1 as the paper's (App. B, Table 4); ``kl_coef`` = 0 where the paper's
    runs use a KL weight of 1e-5 (which needs ``init_logprobs``): pass ``kl_coef=1e-5`` to
    reproduce them.

    Shifting: ``labels`` are Hugging Face labels aligned with ``input_ids``; the loss shifts
    them itself (``hidden[:, t]`` predicts ``labels[:, t+1]``). The primitive
    :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.

    Args:
        hidden (Tensor): [B, T, H] the policy's final hidden states (rolled-out sequences).
        weight (Tensor): [V, H].
        labels (LongTensor): [B, T] Hugging Face labels; the response tokens are scored.
        rewards (Tensor): [B, T] token rewards in the labels' layout (from
            :func:`token_rewards`); read only where ``labels`` is scored (anything, NaN
            included, may stand elsewhere).
        gamma (float): discount γ in [0, 1]. Default: 1.0 (the paper's).
        whiten (bool): ``(G − mean)/(std + 1e-8)`` over the batch's scored tokens.
            Default: False.
        kl_coef (float): >= 0, λ_KL of the per-token k1 penalty. Default: 0.0 (the paper:
            1e-5).
        init_logprobs (Tensor, optional): [B, T] the initial policy's log-probs, labels
            layout; needed when ``kl_coef > 0`` (or ``init_hidden``/``init_weight``/
            ``init_bias``). Default: None.
        **primitive_options: passed to :func:`linear_logprobs`.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; metrics ``reward/mean`` (per scored token), ``return/mean``, and
        ``kl/mean`` (mean k1) with ``kl_coef``.

    Paper: dense-path-reinforce §4.3, Algorithm 1 (steps 6-9).
    """
    check_call(reinforce_loss, hidden, labels, primitive_options)
    check_range("gamma", gamma, 0.0, 1.0, closed=True)
    check_bool("whiten", whiten)
    check_range("kl_coef", kl_coef, 0.0, float("inf"))
    check_per_token("rewards", rewards, labels)
    init = reference_logprobs(labels, ref_logprobs=init_logprobs, ref_hidden=init_hidden,
                              ref_weight=init_weight, ref_bias=init_bias,
                              required=kl_coef > 0, name="init", **primitive_options)

    def returns_of(stats):  # (r̂ [B, T], k1 [B, T] or None, G [B, T]); constants
        logp, mask = stats.out.logprobs, stats.mask
        reward = masked(to_prediction_layout(rewards.detach()).to(logp.dtype), mask)
        k1 = None
        if kl_coef > 0:
            k1 = masked((logp.detach() - init.to(logp.dtype)).clamp(-KL_CLAMP, KL_CLAMP), mask)
        penalised = reward if k1 is None else reward - kl_coef * k1
        returns = masked(discounted_suffix_sum(penalised, gamma), mask)
        if whiten:
            mean = masked_mean(returns, mask)
            var = masked_mean((returns - mean).square(), mask)
            returns = masked((returns - mean) / (var.sqrt() + 1e-8), mask)
        return reward, k1, returns

    def loss_from(stats, present):  # linear in logp: rows outside the chunk are 0
        return -(stats.out.logprobs * returns_of(stats)[2]).sum() / max(labels.shape[0], 1)

    # G_t sums later tokens of the sequence (k1 included); whitening G with k1 inside mixes
    # every sequence's log-probs, so that case is not a sum over sequences.
    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="sequence", additive=not (whiten and kl_coef > 0))
    reward, k1, returns = returns_of(stats)
    mask = stats.mask
    metrics = {"reward/mean": masked_mean(reward, mask), **token_metrics(stats)}
    if k1 is not None:
        metrics["kl/mean"] = masked_mean(k1, mask)
    metrics["return/mean"] = masked_mean(returns, mask)
    return LossOutput(loss, metrics)
