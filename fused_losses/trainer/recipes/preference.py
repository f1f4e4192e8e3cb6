"""Preference pairs (``objectives.md`` §2-3): DPO and its loss types, SimPO, ORPO, CPO, DIL.

Batches hold B chosen rows, then their B rejected rows. Items: pairs. DPO and DIL read a
frozen reference (a copy of the start policy). The per-pair tables (``DPO_LOSSES``,
``DIL_LOSSES``) are the library's: they are functions of [B]-sized log-ratios, and what the
unfused path checks is everything before them (log-probs on materialised logits, sequence
sums, the reference) and around them (the running δ of ``bco_pair``, the NLL terms, metrics).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fused_losses
from fused_losses.objectives import DIL_LOSSES, DPO_LOSSES

from ._common import (Recipe, Stateless, decode, frozen_copy, head_weight, log1mexp,
                      masked_mean, materialise, reference_context, sequence_sums,
                      to_prediction_layout)

REFERENCE = frozenset({"ref_logprobs", "ref_hidden", "ref_weight", "ref_bias",
                       "ref_chosen_logps", "ref_rejected_logps"})
STATE = ("bco_delta", "bco_count", "bco_process_group")  # DPO arguments RunningDelta gives


def pairs(batch, opts) -> int:
    return batch["labels"].shape[0] // 2


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:x.shape[0] // 2], x[x.shape[0] // 2:]


def with_reference(cfg, lm, opts) -> dict:
    return {"ref": frozen_copy(lm)}


def fused(name: str, state_keys: tuple[str, ...] = ()):
    """The library objective ``{name}_loss`` on the policy's hidden states; its mean over this
    micro-batch's pairs is scaled to a share of the step's pairs."""
    function = getattr(fused_losses, f"{name}_loss")

    def make(opts):
        def step(lm, batch, ctx):
            hidden = decode(lm, batch)
            inputs = {k: ctx[k] for k in ("ref_logprobs", *state_keys) if k in ctx}
            out = function(hidden, head_weight(lm, hidden), batch["labels"], **inputs, **opts)
            return out.loss * pairs(batch, opts) / ctx["num_items"], dict(out.metrics)
        return step
    return make


def unfused(pair_loss):
    """The materialised step around ``pair_loss(stats, ctx, opts) -> (per-pair loss [B] or a
    scalar mean, metrics)``: the mean over this micro-batch's pairs, as a share of the step's."""
    def make(opts):
        def step(lm, batch, ctx):
            hidden = decode(lm, batch)
            stats = materialise(hidden, head_weight(lm, hidden), batch["labels"])
            loss, metrics = pair_loss(stats, ctx, opts)
            return loss.mean() * pairs(batch, opts) / ctx["num_items"], metrics
        return step
    return make


def pair_metrics(stats, r_w, r_l, logps_w, logps_l) -> dict:
    """The library's preference metrics (TRL's names) from [B] rewards and sequence log-probs."""
    r_w, r_l = r_w.detach(), r_l.detach()
    logits_w, logits_l = halves(stats.logits_mean().detach())
    mask_w, mask_l = halves(stats.mask)
    return {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
            "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(),
            "rewards/margins": (r_w - r_l).mean(),
            "logps/chosen": logps_w.detach().mean(), "logps/rejected": logps_l.detach().mean(),
            "logits/chosen": masked_mean(logits_w, mask_w),
            "logits/rejected": masked_mean(logits_l, mask_l)}


def chosen_nll(stats) -> torch.Tensor:
    """Token-mean NLL of the chosen rows (the RPO/CPO/ORPO SFT term)."""
    return -masked_mean(halves(stats.logp)[0], halves(stats.mask)[0])


def log_ratios(stats, ctx, average: bool):
    """Policy sequence log-probs [2B] and ρ = policy − reference [2B]."""
    policy = sequence_sums(stats.logp, stats.mask, average)
    ref = sequence_sums(to_prediction_layout(ctx["ref_logprobs"]).to(policy.dtype),
                        stats.mask, average)
    return policy, policy - ref


def smoothed(x, eps):
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------

class RunningDelta:
    """bco_pair's δ: the running mean of the batch-mean reward β·ρ over every training
    micro-batch so far and every process (TRL gathers the ranks' means), carried across
    steps and checkpointed. Kept as tensors: reading it back costs no host sync."""

    def __init__(self):
        self.delta, self.count = torch.zeros(()), torch.zeros(())

    def values(self) -> dict:
        group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 \
            else None
        return {"bco_delta": self.delta, "bco_count": self.count, "bco_process_group": group}

    def update(self, metrics) -> None:
        self.delta, self.count = metrics["bco/delta"], metrics["bco/count"]

    def state_dict(self) -> dict:
        return {"delta": float(self.delta), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        if state:  # (a checkpoint written before δ was carried starts it afresh)
            self.delta, self.count = torch.tensor(state["delta"]), torch.tensor(state["count"])


def running_delta(rewards, delta, count, group):
    """(δ, count) with this batch's mean reward (every rank's, with a ``group``) folded into
    the running mean ``delta`` of ``count`` batch means (objectives.md §2, TRL's running mean)."""
    batch_sum, batches = rewards.detach().mean(), 1
    if group is not None:
        batch_sum = batch_sum.clone()
        dist.all_reduce(batch_sum, group=group)
        batches = dist.get_world_size(group)
    delta, count = (torch.as_tensor(x, dtype=rewards.dtype, device=rewards.device)
                    for x in (delta, count))
    return (count * delta + batch_sum) / (count + batches), count + batches


def dpo_pairs(stats, ctx, opts):
    loss_type, beta = opts["loss_type"], opts["beta"]
    policy, rho = log_ratios(stats, ctx, opts["average_log_prob"] or loss_type == "ipo")
    rho_w, rho_l = halves(rho)
    extra, metrics = {"tau": opts["discopop_tau"]}, {}
    if loss_type == "bco_pair":
        extra["delta"], count = running_delta(beta * rho, ctx["bco_delta"], ctx["bco_count"],
                                              ctx["bco_process_group"])
        metrics.update({"bco/delta": extra["delta"], "bco/count": count})
    loss = DPO_LOSSES[loss_type](rho_w, rho_l, beta, opts["label_smoothing"], extra).mean()
    if opts["rpo_alpha"] is not None:
        nll = chosen_nll(stats)
        loss = loss + opts["rpo_alpha"] * nll
        metrics["nll_loss"] = nll.detach()
    return loss, {**pair_metrics(stats, beta * rho_w, beta * rho_l, *halves(policy)), **metrics}


def dpo_state(opts):
    return RunningDelta() if opts["loss_type"] == "bco_pair" else Stateless()


DPO = Recipe(objective=fused_losses.dpo_loss, data="preference",
             fused=fused("dpo", STATE), unfused=unfused(dpo_pairs),
             unfused_options=frozenset({"loss_type", "beta", "label_smoothing",
                                        "average_log_prob", "discopop_tau", "rpo_alpha"}),
             items=pairs, frozen=with_reference, context=reference_context, state=dpo_state,
             provided=REFERENCE | set(STATE))


# ---------------------------------------------------------------------------------------------
# DIL
# ---------------------------------------------------------------------------------------------

def dil_pairs(stats, ctx, opts):
    variant, beta, cap = opts["variant"], opts["beta"], opts["max_log_ratio"]
    policy, rho = log_ratios(stats, ctx, opts["average_log_prob"])
    metrics = {}
    if cap is not None:
        metrics["density_ratio/clamped"] = (rho.detach() > cap).to(rho.dtype).mean()
        rho = rho.clamp_max(cap)
    rho_w, rho_l = halves(rho)
    logps_w, logps_l = halves(policy)
    loss = DIL_LOSSES[variant](rho_w, rho_l, logps_w, beta)
    scale = beta if variant == "dpo" else 1.0
    return loss, {**pair_metrics(stats, scale * rho_w, scale * rho_l, logps_w, logps_l),
                  "density_ratio/chosen": torch.exp(rho_w.detach()).mean(),
                  "density_ratio/rejected": torch.exp(rho_l.detach()).mean(), **metrics}


DIL = Recipe(objective=fused_losses.dil_loss, data="preference", fused=fused("dil"),
             unfused=unfused(dil_pairs),
             unfused_options=frozenset({"variant", "beta", "average_log_prob", "max_log_ratio"}),
             items=pairs, frozen=with_reference, context=reference_context, provided=REFERENCE)


# ---------------------------------------------------------------------------------------------
# Reference-free: SimPO, ORPO, CPO
# ---------------------------------------------------------------------------------------------

def simpo_pairs(stats, ctx, opts):
    beta, gamma = opts["beta"], opts["gamma"]
    w, l = halves(sequence_sums(stats.logp, stats.mask, True))
    loss = smoothed(beta * (w - l) - gamma, opts["label_smoothing"])
    return loss, pair_metrics(stats, beta * w, beta * l, w, l)


def orpo_pairs(stats, ctx, opts):
    lam = opts["lam"]
    w, l = halves(sequence_sums(stats.logp, stats.mask, True))
    tiny = torch.finfo(w.dtype).tiny  # a sequence of certain tokens: large, finite odds
    log_odds = (w - l) - (log1mexp(w.clamp_max(-tiny)) - log1mexp(l.clamp_max(-tiny)))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(stats)
    return nll - lam * ratio, {**pair_metrics(stats, lam * w, lam * l, w, l),
                               "nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                               "log_odds_chosen": log_odds.detach().mean()}


def cpo_pairs(stats, ctx, opts):
    beta = opts["beta"]
    w, l = halves(sequence_sums(stats.logp, stats.mask, opts["average_log_prob"]))
    nll = chosen_nll(stats)
    loss = smoothed(beta * (w - l), opts["label_smoothing"]) + opts["alpha"] * nll
    return loss, {**pair_metrics(stats, beta * w, beta * l, w, l), "nll_loss": nll.detach()}


SIMPO = Recipe(objective=fused_losses.simpo_loss, data="preference", fused=fused("simpo"),
               unfused=unfused(simpo_pairs),
               unfused_options=frozenset({"beta", "gamma", "label_smoothing"}), items=pairs,
               renames={"simpo_gamma": "gamma"})  # TRL's names for them
ORPO = Recipe(objective=fused_losses.orpo_loss, data="preference", fused=fused("orpo"),
              unfused=unfused(orpo_pairs), unfused_options=frozenset({"lam"}), items=pairs,
              renames={"beta": "lam"})  # --beta, and TRL's name
CPO = Recipe(objective=fused_losses.cpo_loss, data="preference", fused=fused("cpo"),
             unfused=unfused(cpo_pairs),
             unfused_options=frozenset({"beta", "alpha", "label_smoothing", "average_log_prob"}),
             items=pairs, renames={"cpo_alpha": "alpha"})
