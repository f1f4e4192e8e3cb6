"""The trainer's loss step for each objective, fused or unfused, picked once at setup.

A loss step maps ``(lm, batch, ctx)`` to ``(loss, metrics)`` where ``loss`` is already
divided by ``ctx["num_items"]`` -- the count of items (scored tokens for SFT, pairs or
sequences otherwise) in the whole optimizer step, over all micro-batches and processes -- so
that summing micro-batch gradients gives exactly the big-batch gradient.

- ``fused``: the library's objectives (``fused_losses.sft_loss`` ...) on the decoder's last
  hidden state and the head weight; ``[tokens x vocab]`` is never formed.
- ``unfused``: what users run today: full logits ``hidden @ W.T`` for every position,
  ``log_softmax``, gather (``fused_losses.reference``), then the same objective math written
  out here on per-token log-probs. Until the library exposes its objectives' math on given
  per-token log-probs, that math is restated below from ``objectives.md``; the trainer tests
  check that both paths give the same losses step by step, so any drift is caught.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

import fused_losses
from fused_losses.reference import linear_cross_entropy_reference, linear_logprobs_reference

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
# Per-token log-probs in the labels' layout: the only place the two paths differ
# ---------------------------------------------------------------------------------------------

def token_logprobs_fused(hidden, weight, labels, return_lse=False):
    out = fused_losses.linear_logprobs(hidden, weight, shift(labels), return_lse=return_lse)
    return to_label_layout(out.logprobs), (to_label_layout(out.lse) if return_lse else None)


def token_logprobs_unfused(hidden, weight, labels, return_lse=False):
    out = linear_logprobs_reference(hidden, weight, shift(labels), return_lse=return_lse)
    return to_label_layout(out.logprobs), (to_label_layout(out.lse) if return_lse else None)


TOKEN_LOGPROBS = {"fused": token_logprobs_fused, "unfused": token_logprobs_unfused}


@torch.no_grad()
def reference_logprobs(ref_lm, batch, impl: str) -> torch.Tensor:
    """Per-token log-probs of the frozen reference, labels' layout, [B', T] float32."""
    hidden = decode(ref_lm, batch)
    return TOKEN_LOGPROBS[impl](hidden, head_weight(ref_lm, hidden), batch["labels"])[0].float()


# ---------------------------------------------------------------------------------------------
# Objective math on per-token log-probs (objectives.md), shared by the unfused path
# ---------------------------------------------------------------------------------------------

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


_DPO = {
    "sigmoid": lambda h, b, eps: -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h),
    "robust": lambda h, b, eps: (-(1 - eps) * F.logsigmoid(b * h)
                                 + eps * F.logsigmoid(-b * h)) / (1 - 2 * eps),
    "hinge": lambda h, b, eps: torch.relu(1 - b * h),
    "ipo": lambda h, b, eps: (h - 1 / (2 * b)) ** 2,
}

_DIL = {
    "lsif": lambda rw, rl, aw, b: -torch.exp(rw) + 0.5 * torch.exp(2 * rl),
    "ukl": lambda rw, rl, aw, b: -aw + torch.exp(rl),
    "bce": lambda rw, rl, aw, b: -F.logsigmoid(rw) - F.logsigmoid(-rl),
    "dpo": lambda rw, rl, aw, b: -F.logsigmoid(b * (rw - rl)),
}


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_math(objective, logp, mask, ref, opts):
    """Loss (mean over pairs) and metrics for the preference objectives, on [2B, T] log-probs."""
    if objective == "dpo":
        loss_type = opts.get("loss_type", "sigmoid")
        if loss_type not in _DPO:
            raise ValueError(f"--impl unfused supports dpo loss_type in {sorted(_DPO)}, "
                             f"got {loss_type!r}")
        beta, eps = opts.get("beta", 0.1), opts.get("label_smoothing", 0.0)
        average = opts.get("average_log_prob", loss_type == "ipo")
        s = _seq(logp, mask, average)
        rho_w, rho_l = _split(s - _seq(ref, mask, average))
        loss = _DPO[loss_type](rho_w - rho_l, beta, eps)
        return loss.mean(), _pair_metrics(beta * rho_w, beta * rho_l, *_split(s))
    if objective == "dil":
        variant, beta = opts.get("variant", "lsif"), opts.get("beta", 0.1)
        s = _seq(logp, mask, opts.get("average_log_prob", True))
        rho_w, rho_l = _split(s - _seq(ref, mask, opts.get("average_log_prob", True)))
        loss = _DIL[variant](rho_w, rho_l, _split(s)[0], beta)
        return loss.mean(), _pair_metrics(rho_w, rho_l, *_split(s))
    avg_w, avg_l = _split(_seq(logp, mask, True))
    sum_w, sum_l = _split(_seq(logp, mask, False))
    if objective == "simpo":
        beta, gamma = opts.get("beta", 2.0), opts.get("gamma", 0.5)
        loss = -F.logsigmoid(beta * (avg_w - avg_l) - gamma)
        return loss.mean(), _pair_metrics(beta * avg_w, beta * avg_l, avg_w, avg_l)
    nll_w = -sum_w.sum() / _split(mask)[0].sum().clamp(min=1)  # token mean over chosen
    if objective == "orpo":
        lam = opts.get("beta", 0.1)
        log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
        loss = nll_w - lam * F.logsigmoid(log_odds).mean()
        return loss, _pair_metrics(lam * avg_w, lam * avg_l, avg_w, avg_l)
    if objective == "cpo":
        beta, alpha = opts.get("beta", 0.1), opts.get("alpha", 1.0)
        loss = -F.logsigmoid(beta * (sum_w - sum_l)).mean() + alpha * nll_w
        return loss, _pair_metrics(beta * sum_w, beta * sum_l, sum_w, sum_l)
    raise ValueError(f"unknown preference objective {objective!r}")


def reinforce_math(logp, mask, rewards, opts):
    """Dense-path REINFORCE: L = -(1/B) sum_i sum_t m_t logp_t G_t, G the discounted return."""
    gamma = opts.get("gamma", 1.0)
    r = rewards * mask
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    if opts.get("whiten", False):
        scored = returns[mask.bool()]
        returns = (returns - scored.mean()) / (scored.std() + 1e-8)
    loss = -(logp * mask * returns.detach()).sum(-1).mean()
    return loss, {"reward/mean": (r.sum(-1)).mean().detach()}


def ift_math(lm, batch, opts, logprob_fn):
    """IFT (objectives.md §4): greedy pass, mixed embeddings, weighted pass-2 NLL; mean over
    sequences of the per-sequence loss."""
    lam, gamma = opts.get("lam", 0.2), opts.get("gamma", 0.95)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        hidden = decode(lm, batch)
        logits = hidden @ head_weight(lm, hidden).T  # the unfused path materialises, as usual
        greedy = logits.argmax(-1)
        del logits
    mixed_ids = torch.where(labels == IGNORE, ids, F.pad(greedy[:, :-1], (1, 0), value=0))
    embed = lm.get_input_embeddings()
    embeds = (1 - lam) * embed(ids) + lam * embed(mixed_ids)
    hidden = decode(lm, batch, inputs_embeds=embeds)
    logp, _ = logprob_fn(hidden, head_weight(lm, hidden), labels)
    mask = (labels != IGNORE).float()
    nll = -logp * mask
    weights = torch.zeros_like(nll)
    running = torch.zeros_like(nll[:, 0])
    for t in range(nll.shape[1] - 1, -1, -1):
        running = nll[:, t] + gamma * running
        weights[:, t] = running
    weights = weights * mask
    if opts.get("detach_weights", False):
        weights = weights.detach()
    per_seq = (weights * nll).sum(-1) / (weights.sum(-1) + 1e-8)
    return per_seq.mean(), {}


# ---------------------------------------------------------------------------------------------
# Picking the loss step
# ---------------------------------------------------------------------------------------------

LossStep = Callable[..., tuple[torch.Tensor, dict]]


def make_loss_step(objective: str, impl: str, opts: dict) -> LossStep:
    """The one function the loop calls: ``step(lm, batch, ctx) -> (loss, metrics)``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    logprob_fn = TOKEN_LOGPROBS[impl]
    library = _library_objectives() if impl == "fused" else None

    def sft(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        if library is not None:
            out = library.sft_loss(hidden, weight, labels, ref_logprobs=ctx.get("ref_logprobs"),
                                   num_items_in_batch=ctx["num_items"], **opts)
            return out.loss, dict(out.metrics)
        if opts.get("divergence", "total_variation") != "total_variation":
            raise ValueError("this path supports only divergence='total_variation'")
        ce = (fused_losses.linear_cross_entropy if impl == "fused"
              else linear_cross_entropy_reference)
        return ce(hidden, weight, shift(labels), num_items_in_batch=ctx["num_items"]), {}

    def preference(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        share = labels.shape[0] // 2 / ctx["num_items"]  # pairs here / pairs in the step
        if library is not None:
            fn = getattr(library, f"{objective}_loss")
            ref = {"ref_logprobs": ctx["ref_logprobs"]} if objective in NEEDS_REF else {}
            out = fn(hidden, weight, labels, **ref, **opts)
            return out.loss * share, dict(out.metrics)
        logp, _ = logprob_fn(hidden, weight, labels)
        mask = (labels != IGNORE).float()
        loss, metrics = preference_math(objective, logp, mask, ctx.get("ref_logprobs"), opts)
        return loss * share, metrics

    def reinforce(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight, labels = head_weight(lm, hidden), batch["labels"]
        share = labels.shape[0] / ctx["num_items"]
        if library is not None:
            out = library.reinforce_loss(hidden, weight, labels, rewards=ctx["rewards"], **opts)
            return out.loss * share, dict(out.metrics)
        logp, _ = logprob_fn(hidden, weight, labels)
        loss, metrics = reinforce_math(logp, (labels != IGNORE).float(), ctx["rewards"], opts)
        return loss * share, metrics

    def ift(lm, batch, ctx):
        share = batch["labels"].shape[0] / ctx["num_items"]
        if library is not None:
            out = library.ift_loss(lm, batch["input_ids"], batch["labels"],
                                   attention_mask=batch["attention_mask"], **opts)
            return out.loss * share, dict(out.metrics)
        loss, metrics = ift_math(lm, batch, opts, logprob_fn)
        return loss * share, metrics

    if objective == "sft":
        return sft
    if objective == "reinforce":
        return reinforce
    if objective == "ift":
        return ift
    return preference


def _library_objectives():
    """The library's objective functions once they exist (``fused_losses.sft_loss`` ...);
    None until then, and the fused path uses the primitive with the math above."""
    return fused_losses if hasattr(fused_losses, "dpo_loss") else None


def items_in(objective: str, batch) -> int:
    """What a step's loss is normalised by: scored tokens (SFT), pairs, or sequences."""
    labels = batch["labels"]
    if objective == "sft":
        return int((shift(labels) != IGNORE).sum())
    if objective in PREFERENCE:
        return labels.shape[0] // 2
    return labels.shape[0]
