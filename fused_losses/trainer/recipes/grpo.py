"""GRPO with a verifiable reward (``objectives.md`` §7) on completions sampled from the policy.

Batches come from ``sampling.GenerationBatches``: each step's prompts get
``--num-generations`` completions of at most ``--max-completion-length`` tokens sampled from
the current policy at the loss's temperature (``--temperature``, default 1: the model's own
logits divided by it, as TRL samples and scores), scored by ``rewards.reward`` (1 for the
right final number, partial credit for the answer's format) and given group-normalised
advantages ``(r − mean_group) / (std_group + 1e-4)`` (TRL's default
``scale_rewards="group"``). One optimizer step per generation batch, so the loss is
on-policy (the old policy is the current one: ``old_logprobs = sg(logp)``, as TRL does then).
With ``beta > 0`` a frozen copy of the start policy is the reference, scored at the same
temperature. A model whose logits are soft-capped samples ``softcap(z) / τ``, which the
primitive cannot form for τ ≠ 1 (it caps ``z / τ``): that pair is refused at set-up.

Items (the loss divisor over the step): scored tokens for the token-normalised loss types
(``dapo``, ``bnpo``, ``cispo``), completions for ``grpo`` and ``dr_grpo``. Each micro-batch's
loss is the library's, normalised by the micro-batch, times its share of the step's items;
for ``dapo`` that is the step's token sum over the step's tokens, exactly.
"""
from __future__ import annotations

import math

import torch

import fused_losses
from fused_losses.objectives.logprobs import causal_lm_head, merged_options

from .. import rewards as R
from ..errors import TrainError
from ..sampling import generation_batches, sampling_temperature
from ._common import (IGNORE, Recipe, decode, frozen_copy, frozen_logprobs, head,
                      masked_mean, materialise, shift, to_prediction_layout)

TOKEN_ITEMS = frozenset({"dapo", "bnpo", "cispo"})


def items(batch, opts) -> int:
    if opts["loss_type"] in TOKEN_ITEMS:
        return int((shift(batch["labels"]) != IGNORE).sum())
    return batch["labels"].shape[0]


def reward_metrics(batch) -> dict:
    """The sampled completions' rewards (TRL's ``reward``), the share of them that is right
    and their mean length in tokens."""
    rewards = batch["rewards"]
    return {"reward": rewards.mean(), "reward/correct": (rewards == R.CORRECT).float().mean(),
            "completions/mean_length": (shift(batch["labels"]) != IGNORE).sum(-1)
            .float().mean()}


def fused(opts):
    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        ref = {k: ctx[k] for k in ("ref_logprobs",) if k in ctx}
        out = fused_losses.grpo_loss(hidden, lm_head.weight, batch["labels"],
                                     batch["advantages"], **ref,
                                     **merged_options(lm_head, opts))
        share = items(batch, opts) / ctx["num_items"]
        return out.loss * share, {**out.metrics, **reward_metrics(batch)}
    return step


def unfused(opts):
    """TRL's GRPO loss written out on materialised logits (prediction layout): the model's
    own logits divided by the sampling temperature."""
    loss_type, beta, coef = opts["loss_type"], opts["beta"], opts["entropy_coef"]
    low, high = opts["epsilon_low"], opts["epsilon_high"]
    tempered = {"temperature": sampling_temperature(opts)}

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        stats = materialise(hidden, lm_head.weight, batch["labels"],
                            **merged_options(lm_head, tempered))
        logp, mask = stats.logp, stats.mask
        adv = batch["advantages"].to(logp.dtype).unsqueeze(1)
        log_ratio = logp - logp.detach()  # on-policy: the sampling policy is this one
        if opts["importance_sampling_level"] == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True) \
                .clamp(min=1)
        ratio = torch.exp(log_ratio)
        if loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=high).detach() * adv * logp
        else:
            per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - low, 1 + high) * adv)
        metrics = {}
        if "ref_logprobs" in ctx:
            gap = to_prediction_layout(ctx["ref_logprobs"]).to(logp.dtype) - logp
            kl = torch.exp(gap) - gap - 1
            per_token = per_token + beta * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        tokens, rows = mask.sum().clamp(min=1), mask.shape[0]
        if loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows
        elif loss_type == "dr_grpo":
            loss = (per_token * mask).sum() / (rows * opts["max_completion_length"])
        else:  # dapo, bnpo, cispo: over this micro-batch's tokens; the share makes the step's
            loss = (per_token * mask).sum() / tokens
        metrics.update(clip_metrics(ratio.detach(), adv, mask, loss_type, low, high))
        if coef:
            logits = stats.logits
            entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
            mean_entropy = (entropy * mask).sum() / tokens
            metrics.update(entropy=mean_entropy.detach(), policy_loss=loss.detach())
            loss = loss - coef * mean_entropy
        share = items(batch, opts) / ctx["num_items"]
        return loss * share, {**metrics, **reward_metrics(batch)}
    return step


def clip_metrics(ratio, adv, mask, loss_type, low, high) -> dict:
    """TRL's clipping shares: over scored tokens, or over completions when the ratio and the
    advantage are one per completion (sequence level)."""
    per_completion = ratio.shape[-1] == 1

    def mean(flags):
        return flags.float().mean() if per_completion else masked_mean(flags.float(), mask)

    def per_row(flags):
        return flags.float().squeeze(-1) if per_completion \
            else (flags.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    if loss_type == "cispo":
        return {"cispo_clip_ratio": mean((ratio > high) & (adv > 0))}
    below, above = (ratio < 1 - low) & (adv < 0), (ratio > 1 + high) & (adv > 0)
    rows = torch.ones_like(mask[:, 0], dtype=torch.bool) if per_completion else mask.sum(-1) > 0
    return {"clip_ratio/low_mean": mean(below), "clip_ratio/high_mean": mean(above),
            "clip_ratio/region_mean": mean(below | above),
            "clip_ratio/low_min": per_row(below)[rows].min() if rows.any()
            else torch.zeros(()),
            "clip_ratio/high_max": per_row(above)[rows].max() if rows.any()
            else torch.zeros(())}


def frozen(cfg, lm, opts) -> dict:
    """The reference (with β > 0); first refuses a temperature the loss cannot apply as
    ``generate`` does on this model."""
    softcap = causal_lm_head(lm).options.get("softcap")
    temperature = sampling_temperature(opts)
    if softcap is not None and temperature != 1:
        given = "--temperature" if cfg.temperature is not None else "--loss-kwargs temperature"
        model = "--model-config" if cfg.model_config else f"--model {cfg.model}"
        raise TrainError(f"{given} {temperature:g} with {model}: {type(lm).__name__} soft-caps "
                         f"its logits (final_logit_softcapping {softcap:g}), so generate "
                         f"samples softcap(z)/τ, which the loss cannot form (the primitive "
                         f"caps z/τ); use temperature 1 with this model")
    return {"ref": frozen_copy(lm)} if opts["beta"] else {}


def context(models, batch, impl, opts) -> dict:
    """The reference's log-probs at the sampling temperature, as the policy's (TRL's)."""
    if "ref" not in models:
        return {}
    return {"ref_logprobs": frozen_logprobs(models["ref"], batch, impl,
                                            sampling_temperature(opts))}


def check(cfg) -> list[str]:
    problems = []
    if cfg.num_generations < 2:
        problems.append(f"--num-generations must be >= 2 for grpo (advantages are normalised "
                        f"within each prompt's group), got {cfg.num_generations}")
    if cfg.precompute_ref:
        problems.append("--precompute-ref is not available for grpo: its completions are "
                        "sampled at each step, so there is nothing to score in advance")
    return problems


def check_options(opts) -> list[str]:
    """The sampling temperature ``generate`` and both implementations divide by."""
    temperature = opts.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        return [f"temperature must be a finite number > 0 for grpo (the sampling "
                f"temperature), got {temperature!r}"]
    return []


RECIPE = Recipe(objective=fused_losses.grpo_loss, data="sft", fused=fused, unfused=unfused,
                unfused_options=frozenset({"beta", "epsilon_low", "epsilon_high", "loss_type",
                                           "importance_sampling_level", "entropy_coef",
                                           "max_completion_length", "temperature"}),
                items=items, frozen=frozen, context=context, sampler=generation_batches,
                check=check, check_options=check_options, flags=("max_completion_length",),
                provided=frozenset({"advantages", "old_logprobs", "ref_logprobs", "ref_hidden",
                                    "ref_weight", "ref_bias", "vllm_is_ratio",
                                    "num_items_in_batch"}))
