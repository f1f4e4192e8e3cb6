"""Dense-Path REINFORCE (``objectives.md`` §5) on token rewards ``log π_SFT − log π_ref``.

Frozen models: the reward model (``--reward-model``), its reference (``--reward-ref``, else
a copy of the start policy) and, with ``kl_coef > 0``, the start policy for the KL penalty.
Items: sequences (the loss is ``−(1/B) Σ_i Σ_t m_t logp_t G_t``).
"""
from __future__ import annotations

import fused_losses
from fused_losses.objectives.logprobs import merged_options

from ._common import (Recipe, decode, frozen_copy, frozen_logprobs, head, load_frozen,
                      masked_mean, materialise, suffix_sums, to_prediction_layout)

KL_CLAMP = 10.0  # |k1| is clamped to this before the penalty (objectives.md §5)


def fused(opts):
    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        init = {"init_logprobs": ctx["init_logprobs"]} if "init_logprobs" in ctx else {}
        lm_head = head(lm, hidden)
        out = fused_losses.reinforce_loss(hidden, lm_head.weight, batch["labels"],
                                          rewards=ctx["rewards"], **init,
                                          **merged_options(lm_head, opts))
        return out.loss * items(batch, opts) / ctx["num_items"], dict(out.metrics)
    return step


def unfused(opts):
    gamma, kl_coef = opts["gamma"], opts["kl_coef"]

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        stats = materialise(hidden, lm_head.weight, batch["labels"], **lm_head.options)
        logp, mask = stats.logp, stats.mask
        reward = to_prediction_layout(ctx["rewards"]).to(logp.dtype) * mask
        penalised, metrics = reward, {"reward/mean": masked_mean(reward, mask)}
        if kl_coef > 0:
            init = to_prediction_layout(ctx["init_logprobs"]).to(logp.dtype)
            k1 = (logp.detach() - init).clamp(-KL_CLAMP, KL_CLAMP) * mask
            penalised = reward - kl_coef * k1
            metrics["kl/mean"] = masked_mean(k1, mask)
        returns = suffix_sums(penalised, gamma) * mask
        if opts["whiten"]:
            mean = masked_mean(returns, mask)
            std = masked_mean((returns - mean).square(), mask).sqrt()
            returns = (returns - mean) / (std + 1e-8) * mask
        metrics["return/mean"] = masked_mean(returns, mask)
        loss = -(logp * returns.detach()).sum() / ctx["num_items"]
        return loss, metrics
    return step


def items(batch, opts) -> int:
    return batch["labels"].shape[0]


def frozen(cfg, lm, opts) -> dict:
    models = {"reward": load_frozen(cfg.reward_model, lm, "--reward-model"),
              "reward_ref": (load_frozen(cfg.reward_ref, lm, "--reward-ref") if cfg.reward_ref
                             else frozen_copy(lm))}
    if opts["kl_coef"] > 0:  # the KL penalty is against the start policy
        models["init"] = frozen_copy(lm)
    return models


def context(models, batch, impl, opts) -> dict:
    ctx = {"rewards": frozen_logprobs(models["reward"], batch, impl)
           - frozen_logprobs(models["reward_ref"], batch, impl)}
    if "init" in models:
        ctx["init_logprobs"] = frozen_logprobs(models["init"], batch, impl)
    return ctx


def check(cfg) -> list[str]:
    if cfg.reward_model:
        return []
    return ["--objective reinforce needs --reward-model DIR (the SFT model whose log-prob "
            "ratio to --reward-ref gives the token rewards)"]


RECIPE = Recipe(objective=fused_losses.reinforce_loss, data="sft", fused=fused,
                unfused=unfused, unfused_options=frozenset({"gamma", "whiten", "kl_coef"}),
                items=items, frozen=frozen, context=context, check=check,
                own_flags=frozenset({"reward_model", "reward_ref"}),
                provided=frozenset({"rewards", "init_logprobs", "init_hidden", "init_weight",
                                    "init_bias"}))
