"""f-divergence SFT (``objectives.md`` §1); ``total_variation`` is plain SFT.

Items: scored tokens (in both value modes: the contract divides the summed loss by them).
A frozen reference (a copy of the start policy) unless the divergence is linear.
"""
from __future__ import annotations

import math

import torch

import fused_losses
from fused_losses.objectives.logprobs import merged_options

from ._common import (Recipe, decode, frozen_copy, head, log1mexp, masked_mean,
                      materialise, reference_context, shift, to_prediction_layout, IGNORE)

LINEAR = "total_variation"
_LOG2 = math.log(2.0)
# φ, φ' and the guard's cut-off u_c(max_weight) where φ'(u_c) = max_weight (None: no guard);
# objectives.md §1's table, written out again for the naive path.
PHI = {
    "total_variation": (lambda u: u, lambda u: torch.ones_like(u), None),
    "pearson_chi2": (lambda u: u - u.square() / 4, lambda u: 1 - u / 2, None),
    "squared_hellinger": (lambda u: u / (1 + u), lambda u: (1 + u).pow(-2),
                          lambda w: -1 + w ** -0.5),
    "kl": (lambda u: -torch.exp(-u - 1), lambda u: torch.exp(-u - 1),
           lambda w: -1 - math.log(w)),
    "reverse_kl": (lambda u: 1 + torch.log(u), lambda u: 1 / u, lambda w: 1 / w),
    "jensen_shannon": (lambda u: _LOG2 + log1mexp(-u - _LOG2),
                       lambda u: 1 / (2 * torch.exp(u) - 1),
                       lambda w: math.log((1 + 1 / w) / 2)),
    "gan": (lambda u: log1mexp(-u), lambda u: 1 / torch.expm1(u),
            lambda w: math.log(1 + 1 / w)),
}


def phi_guarded(divergence: str, u: torch.Tensor, max_weight: float):
    """``(φ(u), guarded)``: below ``u_c`` φ continues as its tangent at ``u_c``."""
    phi, dphi, cutoff = PHI[divergence]
    if cutoff is None:
        return phi(u), torch.zeros_like(u, dtype=torch.bool)
    c = torch.tensor(cutoff(max_weight), dtype=u.dtype, device=u.device)
    guarded = u < c
    return torch.where(guarded, phi(c) + dphi(c) * (u - c), phi(torch.maximum(u, c))), guarded


def _linear(opts) -> bool:
    return opts.get("divergence", LINEAR) == LINEAR


def fused(opts):
    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        out = fused_losses.sft_loss(hidden, lm_head.weight, batch["labels"],
                                    ref_logprobs=ctx.get("ref_logprobs"),
                                    num_items_in_batch=ctx["num_items"],
                                    **merged_options(lm_head, opts))
        return out.loss, dict(out.metrics)
    return step


def unfused(opts):
    divergence, beta = opts["divergence"], opts["beta"]
    sequence, value_grad = opts["value_mode"] == "sequence", opts["value_grad"]
    linear = divergence == LINEAR

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        lm_head = head(lm, hidden)
        stats = materialise(hidden, lm_head.weight, batch["labels"], **lm_head.options)
        logp, mask = stats.logp, stats.mask
        rho = logp if linear else logp - to_prediction_layout(ctx["ref_logprobs"]) * mask
        values = None
        if value_grad or not linear:  # the values are constants of a linear φ: dropped
            lse = stats.lse() if value_grad else stats.lse().detach()
            columns = torch.arange(mask.shape[1], device=mask.device)
            scored = mask.bool()
            if sequence:  # V(s_0) at the first scored position, V(s_T) one past the last
                first = torch.where(scored, columns, mask.shape[1]).amin(-1)
                end = torch.where(scored, columns, -1).amax(-1) + 1
                gather = lambda at: lse.gather(1, at.clamp(0, mask.shape[1] - 1)[:, None])[:, 0]
                values = gather(first) - gather(end)
            else:  # V(s_t) − V(s_{t+1}): s_{t+1} is at the position of y_t itself
                values = lse - torch.nn.functional.pad(lse[:, 1:], (0, 1))
        if sequence:
            u = beta * (rho.sum(-1) + (values if values is not None else 0))
            weights = (mask.sum(-1) > 0).to(u.dtype)  # one term per sequence with a token
        else:
            u = beta * (rho + values if values is not None else rho)
            weights = mask
        phi, guarded = phi_guarded(divergence, u, opts["max_weight"])
        loss = -(torch.where(weights.bool(), phi, torch.zeros_like(phi))).sum() / ctx["num_items"]
        return loss, {"nll": -masked_mean(logp.detach(), mask),
                      "u/mean": masked_mean(u.detach(), weights),
                      "guard/fraction": masked_mean(guarded.to(u.dtype), weights)}
    return step


def items(batch, opts) -> int:
    return int((shift(batch["labels"]) != IGNORE).sum())


def frozen(cfg, lm, opts) -> dict:
    return {} if _linear(opts) else {"ref": frozen_copy(lm)}


def context(models, batch, impl, opts) -> dict:
    return reference_context(models, batch, impl, opts) if "ref" in models else {}


RECIPE = Recipe(objective=fused_losses.sft_loss, data="sft", fused=fused, unfused=unfused,
                unfused_options=frozenset({"divergence", "beta", "value_mode", "value_grad",
                                           "max_weight"}),
                items=items, frozen=frozen, context=context,
                provided=frozenset({"ref_logprobs", "ref_hidden", "ref_weight", "ref_bias",
                                    "num_items_in_batch"}))
