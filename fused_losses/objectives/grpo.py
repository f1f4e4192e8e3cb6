"""The GRPO / PPO family (``objectives.md`` §7): a clipped, importance-weighted policy gradient
on the fused LM head, with the loss types of TRL's ``GRPOTrainer`` and Liger's
``LigerFusedLinearGRPOLoss``.

Per scored token t of sequence i, in the prediction layout (see ``_common``)::

    log-ratio  x_t = logp_t − old_t                 (old = sg(logp) when not given: on-policy)
    ratio      r_t = exp(x_t)                       importance_sampling_level="token"
               r_i = exp(Σ_t m_t·x_t / Σ_t m_t)     "sequence" (GSPO), for every token of i
    surrogate  ℓ_t = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)
               cispo: ℓ_t = −sg(min(r, ε_high))·A·logp_t
    per token  c_t = ℓ_t·s_t + β·kl_t,   kl_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1   (k3)
    loss       Σ_t w_t·c_t − entropy_coef·Σ_t m_t·H_t / N

``s_t`` is the sampler's importance ratio (``vllm_is_ratio``), ``w_t`` the loss type's token
weight (``TOKEN_WEIGHTS``) and N the scored tokens of the batch (of the optimizer step with
``num_items_in_batch``). Every weight depends on the labels only, so the loss is a sum of
per-token terms (per-sequence for GSPO) with normalisers known before the pass: on the torch
backend the gradients are formed in forward (``_common.fused_objective``).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ._common import (IGNORE_INDEX, LossOutput, check_call, check_choice, check_count,
                      check_options, check_positive, check_range, fused_objective, masked_mean,
                      own_options, reference_logprobs, shift_targets, to_prediction_layout,
                      token_metrics)

# Metric names, as TRL's GRPOTrainer logs them.
KL = "kl"
CLIP_LOW, CLIP_HIGH, CLIP_REGION = ("clip_ratio/low_mean", "clip_ratio/high_mean",
                                    "clip_ratio/region_mean")
CLIP_LOW_MIN, CLIP_HIGH_MAX = "clip_ratio/low_min", "clip_ratio/high_max"
CISPO_CLIP = "cispo_clip_ratio"
POLICY_LOSS = "policy_loss"
SAMPLING_RATIO = "sampling/importance_sampling_ratio"  # + /min, /mean, /max

# loss type -> (scored tokens per sequence [B], of the batch, of the optimizer step, B, L)
# -> each token's weight w_t, [B, 1] or a scalar. Citations: the papers TRL's GRPOConfig names.
TokenWeight = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int | None],
                       torch.Tensor | float]


def _sequence_mean(per_row, batch, step, rows, max_len):  # GRPO: mean of per-sequence means
    return 1.0 / (rows * per_row.clamp_min(1)).unsqueeze(-1)


def _batch_tokens(per_row, batch, step, rows, max_len):  # BNPO: token mean of this batch
    return 1.0 / batch.clamp_min(1)


def _constant(per_row, batch, step, rows, max_len):  # Dr. GRPO: a length-free constant
    return 1.0 / (max(rows, 1) * max_len)  # (an empty batch has no token to weigh)


def _step_tokens(per_row, batch, step, rows, max_len):  # DAPO / CISPO: the step's tokens
    return 1.0 / step.clamp_min(1)


TOKEN_WEIGHTS: dict[str, TokenWeight] = {
    "grpo": _sequence_mean,   # Shao et al. 2024 (DeepSeekMath) §4.1.2, Eq. 3
    "bnpo": _batch_tokens,    # TRL's batch-normalised variant
    "dr_grpo": _constant,     # Liu et al. 2025 (Understanding R1-Zero-Like Training) §3.1
    "dapo": _step_tokens,     # Yu et al. 2025 (DAPO) §3.3, token-level policy gradient loss
    "cispo": _step_tokens,    # MiniMax 2025 (MiniMax-M1) §3.1
}


def _clipped(ratio, advantages, logp, epsilon_low, epsilon_high, delta):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7); ``delta`` also caps the unclipped
    branch (two-sided clipping, INTELLECT-2), as TRL and Liger do."""
    capped = ratio if delta is None else ratio.clamp(max=delta)
    return -torch.minimum(capped * advantages,
                          ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)


def _cispo(ratio, advantages, logp, epsilon_low, epsilon_high, delta):
    """REINFORCE weighted by the clipped, detached ratio; ``epsilon_high`` caps the ratio."""
    return -ratio.clamp(max=epsilon_high).detach() * advantages * logp


SURROGATES = {"grpo": _clipped, "bnpo": _clipped, "dr_grpo": _clipped, "dapo": _clipped,
              "cispo": _cispo}

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: LossType = "dapo",
    importance_sampling_level: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    entropy_coef: float = 0.0,
    vllm_is_ratio: torch.Tensor | None = None,
    delta: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    **primitive_options,
) -> LossOutput:
    """GRPO and its relatives on the fused LM head: ``Σ_t w_t·(ℓ_t·s_t + β·kl_t) − c·H̄``.

    See the module docstring for the formula. With ``old_logprobs=None`` the ratio is 1 in
    value (one update per generation, as TRL does then) and the gradient is the policy
    gradient ``−A·∇logp``.

    Args:
        hidden (Tensor): [B, T, H] the policy's final hidden states over prompt ⊕ completion
            (unshifted; never copied). B counts completions (G per prompt, all groups).
        weight (Tensor): [V, H] LM-head weight.
        labels (LongTensor): [B, T] Hugging Face labels: the completion's ids, ``-100`` on
            prompt and padding.
        advantages (Tensor): [B] one per completion (GRPO's group-normalised rewards), or
            [B, T] per token in the labels' layout; constants.
        old_logprobs (Tensor, optional): [B, T] the sampling policy's log-probs, labels
            layout. Default: None (on-policy: ``sg(logp)``).
        ref_logprobs (Tensor, optional): [B, T] the reference's log-probs, labels layout;
            or ``ref_hidden``/``ref_weight``/``ref_bias`` to compute them fused under
            ``no_grad``. Needed when ``beta != 0``; with ``beta = 0`` a given reference only
            adds the ``kl`` metric. Default: None.
        beta (float): >= 0, weight of the k3 KL to the reference. Default: 0.0 (TRL's).
        epsilon_low (float): in [0, 1), lower clip ``1 − ε_low``. Default: 0.2.
        epsilon_high (float): > 0, upper clip ``1 + ε_high``; for ``cispo`` the cap on the
            ratio itself (TRL and Liger read it so; MiniMax-M1 uses e.g. 5.0). Default: 0.2.
        loss_type (str): how token terms are aggregated (``TOKEN_WEIGHTS``): ``"grpo"``
            mean over sequences of each sequence's token mean; ``"bnpo"`` token mean over the
            batch; ``"dr_grpo"`` token sum / (B · ``max_completion_length``); ``"dapo"``
            token sum / scored tokens of the optimizer step; ``"cispo"`` as ``"dapo"`` with
            the CISPO surrogate. Default: "dapo" (TRL's).
        importance_sampling_level (str): ``"token"`` or ``"sequence"`` (GSPO: the geometric
            mean ratio of the sequence for each of its tokens). Default: "token".
        max_completion_length (int, optional): > 0; needed by ``"dr_grpo"``. Default: None.
        entropy_coef (float): subtract ``entropy_coef`` × the mean entropy over the scored
            tokens (normalised like ``"dapo"``, whatever the loss type, as TRL's
            ``entropy_coef``); its gradient flows through the fused entropy. Default: 0.0.
        vllm_is_ratio (Tensor, optional): [B], [B, 1] or [B, T] (labels layout) truncated
            importance weights of the sampler against the trainer (TRL's
            ``importance_sampling_ratio``); multiplies ``ℓ_t`` before the KL is added.
            Default: None.
        delta (float, optional): > 0, caps the unclipped ratio too (two-sided clipping;
            TRL's and Liger's ``delta``). Default: None.
        num_items_in_batch (int or Tensor, optional): > 0, the scored tokens of the whole
            optimizer step (all accumulated micro-batches) for ``"dapo"``/``"cispo"`` and the
            entropy bonus; default: this batch's. Used as given (TRL and Liger divide a
            count over all processes by the number of processes: pass that quotient under
            DDP). The other loss types normalise per batch, as TRL does: divide their loss
            by the accumulation steps yourself. Default: None.
        **primitive_options: passed to :func:`linear_logprobs` (``bias``, ``temperature``
            (the sampling temperature, as TRL divides the logits by it), ``backend``,
            ``ignore_index``, ``chunk_size``, ...). ``return_entropy=True`` adds the
            ``entropy`` metric without the bonus. ``grad_in_forward`` (bool, optional): see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; metrics as TRL names them: ``clip_ratio/{low_mean, high_mean,
        region_mean, low_min, high_max}`` (``cispo_clip_ratio`` for ``"cispo"``), ``kl``
        (mean k3 over scored tokens, with a reference), ``entropy`` (when computed),
        ``policy_loss`` (with ``entropy_coef``), ``sampling/importance_sampling_ratio/{min,
        mean, max}`` (with ``vllm_is_ratio``).

    Papers: Shao et al. 2024 (DeepSeekMath) §4.1 for GRPO; Schulman et al. 2017 (PPO) Eq. 7
    for the clipped surrogate; Zheng et al. 2025 (GSPO) for the sequence-level ratio; the
    loss types as cited beside ``TOKEN_WEIGHTS``.
    """
    check_call(grpo_loss, hidden, labels, primitive_options)
    check_choice("loss_type", loss_type, TOKEN_WEIGHTS)
    check_choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    check_range("beta", beta, 0.0, math.inf)
    check_range("epsilon_low", epsilon_low, 0.0, 1.0)
    check_positive("epsilon_high", epsilon_high)
    check_range("entropy_coef", entropy_coef, -math.inf, math.inf)
    if delta is not None:
        check_positive("delta", delta)
    check_count("num_items_in_batch", num_items_in_batch)
    if max_completion_length is not None and (
            not isinstance(max_completion_length, int) or isinstance(max_completion_length, bool)
            or max_completion_length <= 0):
        raise ValueError(f"max_completion_length must be a positive int, got "
                         f"{max_completion_length!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' divides by B · max_completion_length: pass "
                         "max_completion_length (the generation limit), got None")
    rows = labels.shape[0]
    ignore_index = primitive_options.get("ignore_index", IGNORE_INDEX)
    scored = shift_targets(labels, ignore_index) != ignore_index  # [B, T], prediction layout
    # Constants, in the prediction layout. Values at unscored positions (NaN from a sampler
    # that could not score a token, say) never reach the loss or its gradient: old and ref
    # enter through ``where(live, ...)`` before any non-linear op; the multipliers are
    # replaced here (a NaN factor would turn a zero gradient into NaN).
    adv = _per_row_or_token("advantages", advantages, labels, scored, neutral=0.0)
    is_ratio = None if vllm_is_ratio is None else _per_row_or_token(
        "vllm_is_ratio", vllm_is_ratio, labels, scored, neutral=1.0)
    old = reference_logprobs(labels, ref_logprobs=old_logprobs, required=False, name="old")
    ref = reference_logprobs(labels, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias, required=beta != 0,
                             **primitive_options)
    per_row = scored.sum(-1).double()  # the weights in float64, cast to the loss's dtype
    batch_tokens = per_row.sum()
    step_tokens = batch_tokens if num_items_in_batch is None else torch.as_tensor(
        num_items_in_batch, dtype=torch.float64, device=labels.device).reshape(())
    token_weight = TOKEN_WEIGHTS[loss_type](per_row, batch_tokens, step_tokens, rows,
                                            max_completion_length)
    sequence_level = importance_sampling_level == "sequence"

    def terms(stats, live):
        """(ratio [B, T] or [B, 1], c_t [B, T], kl_t [B, T] or None); ``live`` marks the
        tokens counted: outside them every term is finite and gets no gradient."""
        logp = stats.out.logprobs
        zero = logp.new_zeros(())
        log_ratio = torch.where(live, logp - (logp.detach() if old is None else old.to(logp)),
                                zero)
        if sequence_level:  # GSPO: a sequence's mean log-ratio, for each of its tokens
            log_ratio = log_ratio.sum(-1, keepdim=True) / per_row.clamp_min(1).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        per_token = SURROGATES[loss_type](ratio, adv.to(logp), logp, epsilon_low, epsilon_high,
                                          delta)
        if is_ratio is not None:
            per_token = per_token * is_ratio.to(logp)
        kl = None
        if ref is not None:
            gap = torch.where(live, ref.to(logp) - logp, zero)
            kl = torch.exp(gap) - gap - 1
            if beta:
                per_token = per_token + beta * kl
        return ratio, per_token, kl

    def policy_term(per_token, live):
        weights = token_weight.to(per_token) if torch.is_tensor(token_weight) else token_weight
        return torch.where(live, per_token * weights, per_token.new_zeros(())).sum()

    def entropy_term(stats, live):
        entropy = stats.out.entropy
        total = torch.where(live, entropy, entropy.new_zeros(())).sum()
        return entropy_coef * total / step_tokens.clamp_min(1).to(total)

    def loss_from(stats, present):  # absent tokens (sequences for GSPO) count nothing
        live = scored & (present.unsqueeze(-1) if sequence_level else present)
        loss = policy_term(terms(stats, live)[1], live)
        return loss - entropy_term(stats, live) if entropy_coef else loss

    # Token-level ratios make the loss a sum over tokens: chunks of any size, so the one-pass
    # path holds for completions of any length; GSPO's ratio needs its whole sequence.
    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="sequence" if sequence_level else "token",
                                  return_entropy=entropy_coef != 0)
    with torch.no_grad():
        ratio, per_token, kl = terms(stats, scored)
        metrics = dict(token_metrics(stats))
        if kl is not None:
            metrics[KL] = masked_mean(kl, stats.mask)
        # TRL averages a per-sequence indicator (sequence-level ratio and advantage) over
        # sequences, a per-token one over the scored tokens.
        per_sequence = sequence_level and adv.shape[-1] == 1
        metrics.update(_clip_metrics(ratio, adv.to(ratio), stats.mask, per_sequence, loss_type,
                                     epsilon_low, epsilon_high))
        if entropy_coef:
            metrics[POLICY_LOSS] = policy_term(per_token, scored)
        if is_ratio is not None:
            metrics.update(_ratio_stats(is_ratio.to(ratio), scored))
    return LossOutput(loss, metrics)


def ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor,
    **options,
) -> LossOutput:
    """PPO's clipped surrogate with per-token advantages (e.g. from GAE): :func:`grpo_loss`
    with the rollout policy's log-probs required and ``advantages`` [B, T].

    ``loss = Σ_t m_t·(−min(r_t·A_t, clip(r_t, 1 − ε_low, 1 + ε_high)·A_t)) / N`` with the
    default ``loss_type="dapo"``: the token mean over the batch (or the optimizer step with
    ``num_items_in_batch``), as TRL's former PPOTrainer and verl's ``token-mean`` aggregate.
    The value-function loss is not an LM-head loss and is not here.

    Args:
        hidden, weight, labels: as in :func:`grpo_loss`.
        advantages (Tensor): [B, T] per-token advantages in the labels' layout.
        old_logprobs (Tensor): [B, T] the rollout policy's log-probs, labels layout.
        **options: every other keyword of :func:`grpo_loss` (``epsilon_low``,
            ``epsilon_high``, ``beta``, ``loss_type``, ``num_items_in_batch``, ...) and the
            primitive's options.

    Returns:
        LossOutput: as :func:`grpo_loss`.

    Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7.
    """
    # Checked here, under the name the user called: grpo_loss would name itself.
    grpo_options = own_options(grpo_loss)
    check_options("ppo_loss", {k: v for k, v in options.items() if k not in grpo_options},
                  own=grpo_options)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 2:
        raise ValueError(f"ppo_loss takes per-token advantages [B, T] = "
                         f"{tuple(labels.shape)} (labels layout), got "
                         f"{tuple(getattr(advantages, 'shape', ())) or type(advantages).__name__}"
                         "; use grpo_loss for one advantage per sequence")
    if old_logprobs is None:
        raise ValueError("ppo_loss needs old_logprobs [B, T], the rollout policy's log-probs")
    return grpo_loss(hidden, weight, labels, advantages, old_logprobs=old_logprobs, **options)


# ---------------------------------------------------------------------------------------------
# Inputs and metrics
# ---------------------------------------------------------------------------------------------

def _per_row_or_token(name, value, labels, scored, *, neutral: float) -> torch.Tensor:
    """A constant given per sequence ([B] or [B, 1]) or per token ([B, T], labels layout) ->
    [B, 1] or [B, T] in the prediction layout, detached, ``neutral`` at unscored tokens."""
    rows, length = labels.shape
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor [B] or [B, T], got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.device != labels.device:
        raise ValueError(f"{name} is on {value.device}, expected {labels.device} (of labels)")
    shape = tuple(value.shape)
    if shape in ((rows,), (rows, 1)):
        return value.detach().reshape(rows, 1)
    if shape == (rows, length):
        per_token = to_prediction_layout(value.detach())
        return torch.where(scored, per_token, torch.full_like(per_token, neutral))
    raise ValueError(f"{name} must have shape [B] = [{rows}], [B, 1] or [B, T] = "
                     f"[{rows}, {length}] (labels layout), got {shape}")


def _clip_metrics(ratio, adv, mask, per_sequence, loss_type, epsilon_low, epsilon_high):
    """TRL's clipping metrics; ``per_sequence``: the indicators are [B, 1], one per sequence
    (every sequence counts), else [B, T] over the scored tokens."""
    def mean(indicator):
        values = indicator.to(mask.dtype)
        return values.sum() / max(values.numel(), 1) if per_sequence \
            else masked_mean(values, mask)

    def row_means(indicator):  # [B]
        values = indicator.to(mask.dtype)
        return values.squeeze(-1) if per_sequence \
            else (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)

    if loss_type == "cispo":
        return {CISPO_CLIP: mean((ratio > epsilon_high) & (adv > 0))}
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    has = torch.ones_like(mask[:, 0], dtype=torch.bool) if per_sequence else mask.sum(-1) > 0
    return {  # the extremes over sequences with a scored token
        CLIP_LOW: mean(low), CLIP_HIGH: mean(high), CLIP_REGION: mean(low | high),
        CLIP_LOW_MIN: _extreme(row_means(low), has, largest=False),
        CLIP_HIGH_MAX: _extreme(row_means(high), has, largest=True),
    }


def _ratio_stats(is_ratio, scored):
    """min / mean / max of the sampler's ratio over scored tokens (or over sequences)."""
    if is_ratio.shape[-1] == 1:
        values, counted = is_ratio.squeeze(-1), torch.ones(is_ratio.shape[0], dtype=torch.bool,
                                                           device=is_ratio.device)
    else:
        values, counted = is_ratio, scored
    return {
        f"{SAMPLING_RATIO}/min": _extreme(values, counted, largest=False),
        f"{SAMPLING_RATIO}/mean": masked_mean(values, counted.to(values.dtype)),
        f"{SAMPLING_RATIO}/max": _extreme(values, counted, largest=True),
    }


def _extreme(values, counted, *, largest: bool):
    """The max (``largest``) or min of ``values`` where ``counted``; 0 where nothing is
    counted, an empty batch included (without a host sync to find out)."""
    fill = torch.tensor(-math.inf if largest else math.inf, dtype=values.dtype,
                        device=values.device)
    candidates = torch.cat((torch.where(counted, values, fill).reshape(-1), fill.reshape(1)))
    extreme = candidates.amax() if largest else candidates.amin()
    return torch.where(counted.any(), extreme, 0.0)
