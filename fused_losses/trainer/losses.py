"""The trainer's loss step for each objective, fused or unfused, picked once at setup.

A loss step maps ``(lm, batch, ctx)`` to ``(loss, metrics)`` where ``loss`` is already
divided by ``ctx["num_items"]`` -- the count of items (scored tokens for SFT, pairs or
sequences otherwise) in the whole optimizer step, over all micro-batches and processes -- so
that summing micro-batch gradients gives exactly the big-batch gradient.

- ``fused``: the library's objectives (``fused_losses.sft_loss`` ...) on the decoder's last
  hidden state and the head weight; ``[tokens x vocab]`` is never formed.
- ``unfused``: what users run today: full logits ``hidden @ W.T`` for every position,
  ``log_softmax``, gather (``fused_losses.reference``), then the same objective math on the
  per-token log-probs. The per-pair tables (``DPO_LOSSES``, ``DIL_LOSSES``) and ``phi_safe``
  are the library's; the few lines around them (sequence sums, returns, IFT weights) are
  restated here from ``objectives.md``, because the library's objectives take hidden states,
  not log-probs. The trainer tests check both paths step by step, so drift is caught.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fused_losses
from fused_losses.objectives import DIL_LOSSES, DPO_LOSSES, phi_safe
from fused_losses.reference import linear_cross_entropy_reference, linear_logprobs_reference

from .data import collate
from .distributed import barrier

IGNORE = -100
PREFERENCE = ("dpo", "simpo", "orpo", "cpo", "dil")
OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "cpo", "dil", "ift", "reinforce")
NEEDS_REF = ("dpo", "dil")


def needs_reference(objective: str, options: dict) -> bool:
    if objective == "sft":
        return options.get("divergence", "total_variation") != "total_variation"
    return objective in NEEDS_REF


# ---------------------------------------------------------------------------------------------
# Model pieces: hidden states from the decoder, head weight from get_output_embeddings()
# ---------------------------------------------------------------------------------------------

def decode(lm, batch, inputs_embeds=None) -> torch.Tensor:
    """Last hidden state [B, T, H] of any transformers causal LM (no head applied)."""
    kwargs = dict(attention_mask=batch["attention_mask"], use_cache=False)
    if inputs_embeds is None:
        kwargs["input_ids"] = batch["input_ids"]
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    return lm.get_decoder()(**kwargs).last_hidden_state


def head_weight(lm, hidden: torch.Tensor) -> torch.Tensor:
    # Cast (differentiably) to the hidden dtype: under bf16 autocast the decoder returns bf16.
    return lm.get_output_embeddings().weight.to(hidden.dtype)


def shift(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with hidden: ``targets[:, t] = labels[:, t+1]``, last column ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def to_label_layout(per_hidden: torch.Tensor) -> torch.Tensor:
    """[B, T] values aligned with hidden -> aligned with labels (column 0 is 0)."""
    return F.pad(per_hidden[:, :-1], (1, 0), value=0.0)


# ---------------------------------------------------------------------------------------------
# The unfused path: materialised logits, then the objectives' math on per-token log-probs.
# The per-pair tables (DPO_LOSSES, DIL_LOSSES) and phi_safe are the library's own, so only
# the way per-token log-probs are obtained differs from the fused path.
# ---------------------------------------------------------------------------------------------

def token_logprobs_unfused(hidden, weight, labels, return_lse=False):
    """Full [B, T, V] logits, log_softmax, gather; labels' layout, [B, T] each."""
    out = linear_logprobs_reference(hidden, weight, shift(labels), return_lse=return_lse)
    return to_label_layout(out.logprobs), (to_label_layout(out.lse) if return_lse else None)


@torch.no_grad()
def reference_logprobs(ref_lm, batch, impl: str) -> torch.Tensor:
    """Per-token log-probs of a frozen model, labels' layout, [B', T] float32."""
    if impl == "fused":
        return fused_losses.token_logprobs(ref_lm, batch["input_ids"], batch["labels"],
                                           batch["attention_mask"]).float()
    hidden = decode(ref_lm, batch)
    return token_logprobs_unfused(hidden, head_weight(ref_lm, hidden), batch["labels"])[0]


@torch.no_grad()
def precompute_reference(ref_lm, datasets, out: Path, impl: str, pad_id: int, procs) -> None:
    """Reference log-probs of every row, computed once and cached in the output directory
    (keyed by the implementation); each record's rows are padded alone, so the values do not
    depend on which batch a record later lands in."""
    path = out / f"ref_logprobs_{impl}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        for data, ref in zip(datasets, cached):
            data.ref = ref
        return
    device = next(ref_lm.parameters()).device
    for data in datasets:
        refs = []
        for index in range(len(data.rows)):
            batch = {k: v.to(device) for k, v in collate(data, [index], pad_id).items()}
            values = reference_logprobs(ref_lm, batch, impl).cpu()
            refs.append(tuple(values[k, :len(ids)].clone()
                              for k, (ids, _) in enumerate(data.rows[index])))
        data.ref = refs
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save([data.ref for data in datasets], tmp)
        os.replace(tmp, path)
    barrier(procs)


def _seq(logp, mask, average):
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def _split(x):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _pair_metrics(r_w, r_l, logp_w, logp_l):
    return {"rewards/chosen": r_w.mean().detach(), "rewards/rejected": r_l.mean().detach(),
            "rewards/accuracies": (r_w > r_l).float().mean(),
            "rewards/margins": (r_w - r_l).mean().detach(),
            "logps/chosen": logp_w.mean().detach(), "logps/rejected": logp_l.mean().detach()}


def _smoothed(x, eps):
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_unfused(objective, logp, mask, ref, opts):
    """Loss (mean over pairs) and metrics of a preference objective, [2B, T] log-probs."""
    if objective == "dpo":
        loss_type, beta = opts.get("loss_type", "sigmoid"), opts.get("beta", 0.1)
        if loss_type == "bco_pair":
            raise ValueError("--impl unfused does not implement loss_type='bco_pair'")
        average = opts.get("average_log_prob", False) or loss_type == "ipo"
        s = _seq(logp, mask, average)
        rho_w, rho_l = _split(s - _seq(ref, mask, average))
        extra = {"tau": opts.get("discopop_tau", 0.05)}
        loss = DPO_LOSSES[loss_type](rho_w, rho_l, beta, opts.get("label_smoothing", 0.0), extra)
        return loss.mean(), _pair_metrics(beta * rho_w, beta * rho_l, *_split(s))
    if objective == "dil":
        variant, beta = opts.get("variant", "lsif"), opts.get("beta", 0.1)
        average = opts.get("average_log_prob", True)
        s = _seq(logp, mask, average)
        rho_w, rho_l = _split(s - _seq(ref, mask, average))
        loss = DIL_LOSSES[variant](rho_w, rho_l, _split(s)[0], beta)
        scale = beta if variant == "dpo" else 1.0
        return loss.mean(), _pair_metrics(scale * rho_w, scale * rho_l, *_split(s))
    eps = opts.get("label_smoothing", 0.0)
    nll_w = -_split(logp * mask)[0].sum() / _split(mask)[0].sum().clamp(min=1)  # chosen tokens
    if objective == "simpo":
        beta, gamma = opts.get("beta", 2.0), opts.get("gamma", 0.5)
        w, l = _split(_seq(logp, mask, True))
        loss = _smoothed(beta * (w - l) - gamma, eps).mean()
        return loss, _pair_metrics(beta * w, beta * l, w, l)
    if objective == "orpo":
        lam = opts.get("lam", 0.1)
        w, l = _split(_seq(logp, mask, True))
        log_odds = (w - l) - (_log1mexp(w) - _log1mexp(l))
        loss = nll_w - lam * F.logsigmoid(log_odds).mean()
        return loss, _pair_metrics(lam * w, lam * l, w, l)
    # cpo
    beta, alpha = opts.get("beta", 0.1), opts.get("alpha", 1.0)
    w, l = _split(_seq(logp, mask, opts.get("average_log_prob", False)))
    loss = _smoothed(beta * (w - l), eps).mean() + alpha * nll_w
    return loss, _pair_metrics(beta * w, beta * l, w, l)


UNFUSED_OPTIONS = {
    "dpo": {"loss_type", "beta", "label_smoothing", "average_log_prob", "discopop_tau"},
    "dil": {"variant", "beta", "average_log_prob"},
    "simpo": {"beta", "gamma", "label_smoothing"},
    "orpo": {"lam"},
    "cpo": {"beta", "alpha", "label_smoothing", "average_log_prob"},
    "sft": {"divergence", "beta", "eps", "max_weight"},
    "reinforce": {"gamma", "whiten", "kl_coef"},
    "ift": {"lam", "gamma", "detach_weights"},
}


def sft_unfused(hidden, weight, labels, ref, num_items, opts):
    """f-divergence SFT, token mode (objectives.md §1), on materialised logits."""
    divergence = opts.get("divergence", "total_variation")
    if divergence == "total_variation" and opts.get("beta", 1.0) == 1.0:
        return linear_cross_entropy_reference(hidden, weight, shift(labels),
                                              num_items_in_batch=num_items), {}
    logp, lse = token_logprobs_unfused(hidden, weight, labels, return_lse=True)
    mask = (labels != IGNORE).float()
    first = torch.where(mask.bool(), torch.arange(labels.shape[1]), labels.shape[1]).amin(-1)
    lse = lse.detach()
    lse_0 = lse.gather(1, first.clamp(max=labels.shape[1] - 1).unsqueeze(-1))
    if divergence == "total_variation":  # linear: the constant terms are dropped
        u = opts.get("beta", 1.0) * logp
    else:
        u = opts.get("beta", 1.0) * (logp - ref + lse_0 - lse)
    phi, _ = phi_safe(divergence, u, eps=opts.get("eps", 0.1),
                      max_weight=opts.get("max_weight", 10.0))
    return -(phi * mask).sum() / num_items, {}


def reinforce_unfused(logp, mask, rewards, init, opts):
    """Dense-path REINFORCE: L = -(1/B) sum_i sum_t m_t logp_t G_t, G the discounted return
    of r - kl_coef * clamp(logp - logp_init, +-10)."""
    r = rewards * mask
    if opts.get("kl_coef", 0.0) > 0:
        r = r - opts["kl_coef"] * (logp.detach() - init).clamp(-10, 10) * mask
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + opts.get("gamma", 1.0) * running
        returns[:, t] = running
    returns = returns * mask
    if opts.get("whiten", False):
        mean = (returns * mask).sum() / mask.sum()
        std = ((((returns - mean) * mask) ** 2).sum() / mask.sum()).sqrt()
        returns = (returns - mean) / (std + 1e-8) * mask
    loss = -(logp * mask * returns.detach()).sum() / logp.shape[0]
    return loss, {"reward/mean": (r.sum() / mask.sum()).detach()}


def ift_unfused(lm, batch, opts):
    """IFT (objectives.md §4): greedy pass on full logits, mixed embeddings, weighted NLL."""
    lam, gamma = opts.get("lam", 0.2), opts.get("gamma", 0.95)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        hidden = decode(lm, batch)
        greedy = (hidden @ head_weight(lm, hidden).T).argmax(-1)  # [B, T, V] materialised
    mixed_ids = torch.where(labels == IGNORE, ids, F.pad(greedy[:, :-1], (1, 0), value=0))
    embed = lm.get_input_embeddings()
    hidden = decode(lm, batch, inputs_embeds=(1 - lam) * embed(ids) + lam * embed(mixed_ids))
    logp, _ = token_logprobs_unfused(hidden, head_weight(lm, hidden), labels)
    mask = (labels != IGNORE).float()
    nll = -logp * mask
    weights = torch.zeros_like(nll)
    running = torch.zeros_like(nll[:, 0])
    for t in range(nll.shape[1] - 1, -1, -1):
        running = nll[:, t] + gamma * running
        weights[:, t] = running
    weights = mask if gamma == 0 else weights * mask
    if opts.get("detach_weights", False):
        weights = weights.detach()
    per_seq = (weights * nll).sum(-1) / (weights.sum(-1) + (1e-8 if gamma else 0.0))
    return per_seq.mean(), {}


# ---------------------------------------------------------------------------------------------
# Picking the loss step: one function per (objective, impl), chosen once at setup
# ---------------------------------------------------------------------------------------------

LossStep = Callable[..., tuple[torch.Tensor, dict]]


def make_loss_step(objective: str, impl: str, opts: dict) -> LossStep:
    """The one function the loop calls: ``step(lm, batch, ctx) -> (loss, metrics)``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if impl not in ("fused", "unfused"):
        raise ValueError(f"impl must be 'fused' or 'unfused', got {impl!r}")
    named = {("lam" if objective == "orpo" and k == "beta" else k) for k in opts}
    if impl == "unfused" and named - UNFUSED_OPTIONS[objective]:
        raise ValueError(f"--impl unfused does not implement "
                         f"{sorted(named - UNFUSED_OPTIONS[objective])} for {objective}; "
                         f"it supports {sorted(UNFUSED_OPTIONS[objective])}")
    fused = impl == "fused"
    if objective == "orpo" and "beta" in opts:  # --beta is ORPO's lambda
        opts = {**{k: v for k, v in opts.items() if k != "beta"}, "lam": opts["beta"]}

    def sft(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        if fused:
            out = fused_losses.sft_loss(hidden, weight, labels,
                                        ref_logprobs=ctx.get("ref_logprobs"),
                                        num_items_in_batch=ctx["num_items"], **opts)
            return out.loss, dict(out.metrics)
        return sft_unfused(hidden, weight, labels, ctx.get("ref_logprobs"), ctx["num_items"],
                           opts)

    def preference(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        share = labels.shape[0] // 2 / ctx["num_items"]  # pairs here / pairs in the step
        if fused:
            ref = {"ref_logprobs": ctx["ref_logprobs"]} if objective in NEEDS_REF else {}
            out = getattr(fused_losses, f"{objective}_loss")(hidden, weight, labels, **ref,
                                                               **opts)
            return out.loss * share, dict(out.metrics)
        logp, _ = token_logprobs_unfused(hidden, weight, labels)
        mask = (labels != IGNORE).float()
        loss, metrics = preference_unfused(objective, logp, mask, ctx.get("ref_logprobs"), opts)
        return loss * share, metrics

    def reinforce(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        share = labels.shape[0] / ctx["num_items"]
        if fused:
            init = {"init_logprobs": ctx["init_logprobs"]} if "init_logprobs" in ctx else {}
            out = fused_losses.reinforce_loss(hidden, weight, labels, rewards=ctx["rewards"],
                                              **init, **opts)
            return out.loss * share, dict(out.metrics)
        logp, _ = token_logprobs_unfused(hidden, weight, labels)
        loss, metrics = reinforce_unfused(logp, (labels != IGNORE).float(), ctx["rewards"],
                                          ctx.get("init_logprobs"), opts)
        return loss * share, metrics

    def ift(lm, batch, ctx):
        share = batch["labels"].shape[0] / ctx["num_items"]
        if fused:
            out = fused_losses.ift_loss(lm, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"], **opts)
            return out.loss * share, dict(out.metrics)
        loss, metrics = ift_unfused(lm, batch, opts)
        return loss * share, metrics

    return {"sft": sft, "reinforce": reinforce, "ift": ift}.get(objective, preference)


def items_in(objective: str, batch, opts: dict | None = None) -> int:
    """What a step's loss is normalised by: scored tokens (SFT; sequences with a scored token
    for ``value_mode="sequence"``), pairs, or sequences."""
    targets = shift(batch["labels"]) != IGNORE
    if objective == "sft":
        if (opts or {}).get("value_mode", "token") == "sequence":
            return int(targets.any(-1).sum())
        return int(targets.sum())
    if objective in PREFERENCE:
        return targets.shape[0] // 2
    return targets.shape[0]
