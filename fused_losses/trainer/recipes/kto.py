"""KTO (``objectives.md`` §8) on the preference pairs taken as unpaired examples: a pair's
chosen row is a desirable example, its rejected row an undesirable one, and the loss never
pairs them (it is a mean of per-completion terms). Items: completions.

The reference point z is TRL's estimate on each micro-batch's mismatched pairs
(``fused_losses.mismatched_pairs``: prompt i with completion i−1): the policy's and the
frozen reference's summed log-probs there, ``z = max(mean (S − S_ref), 0)``, no gradient.
"""
from __future__ import annotations

import torch

import fused_losses
from fused_losses.objectives.logprobs import merged_options

from ._common import (Recipe, decode, frozen_copy, frozen_logprobs, head, masked_mean,
                      materialise, sequence_sums, to_prediction_layout)


def completions(batch, opts) -> int:
    return batch["labels"].shape[0]


def desirable(batch) -> torch.Tensor:
    """[2B] bool: the chosen half of the rows (the batch holds B chosen, then B rejected)."""
    rows = batch["labels"].shape[0]
    return torch.arange(rows, device=batch["labels"].device) < rows // 2


def fused(opts):
    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        with torch.no_grad():  # the estimate takes no gradient
            kl_hidden = decode(lm, ctx["kl_batch"])
        lm_head = head(lm, hidden)
        out = fused_losses.kto_loss(hidden, lm_head.weight, batch["labels"],
                                    desirable(batch), ref_logprobs=ctx["ref_logprobs"],
                                    kl_hidden=kl_hidden, kl_labels=ctx["kl_batch"]["labels"],
                                    kl_ref_logprobs=ctx["kl_ref_logprobs"],
                                    **merged_options(lm_head, opts))
        return out.loss * completions(batch, opts) / ctx["num_items"], dict(out.metrics)
    return step


def unfused(opts):
    beta, average = opts["beta"], opts["average_log_prob"]
    weights = (opts["desirable_weight"], opts["undesirable_weight"])

    def sums(stats, ref_logprobs):  # (S, S − S_ref) per row
        policy = sequence_sums(stats.logp, stats.mask, average)
        ref = sequence_sums(to_prediction_layout(ref_logprobs).to(policy.dtype), stats.mask,
                            average)
        return policy, policy - ref

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        stats = materialise(hidden, lm_head.weight, batch["labels"], **lm_head.options)
        policy, rho = sums(stats, ctx["ref_logprobs"])
        with torch.no_grad():
            kl_batch = ctx["kl_batch"]
            kl_hidden = decode(lm, kl_batch)
            kl_stats = materialise(kl_hidden, lm_head.weight, kl_batch["labels"],
                                   **lm_head.options)
            z = sums(kl_stats, ctx["kl_ref_logprobs"])[1].mean().clamp(min=0)
        good = desirable(batch)
        if opts["loss_type"] == "kto":
            losses = torch.where(good, 1 - torch.sigmoid(beta * (rho - z)),
                                 1 - torch.sigmoid(beta * (z - rho)))
        else:  # apo_zero_unpaired
            losses = torch.where(good, 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho))
        loss = (torch.where(good, weights[0], weights[1]) * losses).mean()
        rewards, chosen = beta * rho.detach(), good.to(rho.dtype)
        logits_mean = stats.logits_mean().detach()
        metrics = {"kl": z, "rewards/chosen": masked_mean(rewards, chosen),
                   "rewards/rejected": masked_mean(rewards, 1 - chosen),
                   "logps/chosen": masked_mean(policy.detach(), chosen),
                   "logps/rejected": masked_mean(policy.detach(), 1 - chosen),
                   "logits/chosen": masked_mean(logits_mean, stats.mask * chosen[:, None]),
                   "logits/rejected": masked_mean(logits_mean,
                                                  stats.mask * (1 - chosen)[:, None])}
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss * completions(batch, opts) / ctx["num_items"], metrics
    return step


def frozen(cfg, lm, opts) -> dict:
    return {"ref": frozen_copy(lm)}


def context(models, batch, impl, opts) -> dict:
    """The reference on the batch and on its mismatched pairs (same implementation)."""
    ids, labels, mask = fused_losses.mismatched_pairs(batch["input_ids"], batch["labels"],
                                                      batch["attention_mask"])
    kl_batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    temperature = opts.get("temperature", 1.0)  # the reference is scored as the policy is
    return {"ref_logprobs": frozen_logprobs(models["ref"], batch, impl, temperature),
            "kl_batch": kl_batch,
            "kl_ref_logprobs": frozen_logprobs(models["ref"], kl_batch, impl, temperature)}


def check(cfg) -> list[str]:
    if cfg.precompute_ref:
        return ["--precompute-ref is not available for kto: its reference also scores each "
                "micro-batch's mismatched pairs, which exist only in that batch"]
    return []


RECIPE = Recipe(objective=fused_losses.kto_loss, data="preference", fused=fused,
                unfused=unfused,
                unfused_options=frozenset({"beta", "desirable_weight", "undesirable_weight",
                                           "loss_type", "average_log_prob"}),
                items=completions, frozen=frozen, context=context, check=check,
                provided=frozenset({"preference_labels", "ref_logprobs", "ref_hidden",
                                    "ref_weight", "ref_bias", "kl", "kl_hidden", "kl_labels",
                                    "kl_ref_logprobs", "kl_ref_hidden", "ref_logps",
                                    "ref_KL_logps"}))
