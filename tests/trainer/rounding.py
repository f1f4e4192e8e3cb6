"""How far apart the fused and unfused runs of one configuration may drift: fp32 rounding
times steps times the loss's condition, computed for that configuration.

The two implementations run the same decoder, data, optimizer and objective math; they differ
only in how the per-token statistics of the LM head are formed (fused tiles vs materialised
``[B, T, V]`` logits, ``log_softmax``), so each per-token log-prob ℓ_t (of the policy and of
every frozen model: reference, reward models) differs by a rounding error δ_t, and the final
reductions differ in order. To first order, the step-1 losses then differ by at most

    |ΔL_1| <= Σ_x ( δ_x · K_x + c · u · S_x ),   K_x = Σ_t |∂L/∂x_t|,   S_x = Σ_t |x_t · ∂L/∂x_t|

over every per-token input x of the loss (the policy's log-probs; the reference log-probs, the
token rewards ``log π_R − log π_ref``, ...), where δ_x = max_t |δ_t| is measured on the step-1
inputs (the two implementations' values of the same hidden states), K_x is the condition of
the loss with respect to x, S_x the magnitude of its terms (a sum of n terms in another order
differs by up to about log2(n) · u · S; c = 32 covers n up to 2^32) and u = 2^-24. The weights the two runs train then differ, and
each later step adds its own rounding: the k-th step's losses differ by up to about k times
the first's (AdamW's update is bounded per coordinate, so a small gradient difference cannot
grow faster). ``MARGIN`` covers the change of K and S over the few steps of a test.

Distillation reads whole distributions, not one log-prob per token: its inputs x are both
models' logits z_tv (the student's and the teacher's, which the unfused step forms in
``reference.distill_loss_reference``), K = Σ_tv |∂L/∂z_tv| and S = Σ_tv |z_tv · ∂L/∂z_tv|,
and δ is the largest measured difference of either model's per-token log-probs (the same
GEMMs and log-sum-exps round in both).

A REINFORCE loss ``−(1/B) Σ logp_t · G_t`` whose returns change sign can be near zero while S
is not: its relative difference is then large (1.3e-4 against a fixed 1e-4 once), though the
absolute one stays within this bound; a fixed relative tolerance cannot tell that from a bug.
Over 10 seeds of the tested configurations the differences were 0.1-2.5% of the bound.

Where the bound does not hold: a gradient that is itself rounding noise (a reward model equal
to the reference gives rewards of exactly 0): AdamW turns noise of any size into steps of
size lr, so the two runs part after step 1. No test configuration is such a case.
"""
from __future__ import annotations

import math
import sys
from unittest import mock

import torch

import fused_losses
from fused_losses import reference
from fused_losses.trainer import data as D
from fused_losses.trainer import recipes
from fused_losses.trainer.config import loss_options, parse_args
from fused_losses.trainer.distributed import Processes
from fused_losses.trainer.model import build_model
from fused_losses.trainer.recipes._common import frozen_logprobs

U = 2.0 ** -24  # fp32 unit roundoff
C = 32  # rounding steps of a reordered sum of up to 2^32 terms
MARGIN = 2.0


def _first_batch(argv: list[str]):
    """The run's recipe, options, start policy, first batch and frozen models."""
    cfg = parse_args(argv)
    recipe = recipes.RECIPES[cfg.objective]
    opts = recipes.options(recipe, loss_options(cfg), "unfused")
    lm, _ = build_model(cfg.model, cfg.model_config, cfg.seed)
    enc = D.Encoder.make(D.embedded_tokenizer(cfg.tokenizer_cache))
    records, _ = D.load_records(cfg.data, cfg.eval_data, recipe.data, cfg.train_size,
                                cfg.eval_size)
    train_set = D.encode_records(records, recipe.data, enc, cfg.max_length, cfg.too_long)
    batch = recipe.sampler(cfg, lm, train_set, enc, Processes(1, 0, torch.device("cpu")),
                           opts).batch(0)
    return recipe, opts, lm, batch, recipe.frozen(cfg, lm, opts)


def _delta(model, batch) -> float:
    """The largest difference of the two implementations' log-probs of one model."""
    scored = D.IGNORE != batch["labels"]
    fused = fused_losses.token_logprobs(model, batch["input_ids"], batch["labels"],
                                        batch["attention_mask"])
    return float(((fused - frozen_logprobs(model, batch, "unfused")) * scored).abs().max())


def step_tolerances(argv: list[str], steps: int) -> list[float]:
    """Bounds on ``|loss_fused − loss_unfused|`` at steps 1..``steps`` of the run ``argv``."""
    recipe, opts, lm, batch, models = _first_batch(argv)
    frozen = {impl: recipe.context(models, batch, impl, opts) for impl in ("fused", "unfused")}
    ctx = {"num_items": recipe.items(batch, opts), **frozen["unfused"],
           **recipe.state(opts).values()}
    inputs = {k: v.detach().requires_grad_() for k, v in frozen["unfused"].items()}
    ctx.update(inputs)

    # The value's sensitivity: stop-gradients (REINFORCE's returns, SFT's values) change no
    # value, so they are lifted here; the policy's statistics come from its logits, kept.
    module = sys.modules[recipe.unfused.__module__]
    materialise, kept = module.materialise, []

    def keeping(*args, **kwargs):
        stats = materialise(*args, **kwargs)
        if stats.logits.requires_grad:
            stats.logits.retain_grad()
            kept.append(stats)
        return stats

    # A step on fused_losses.reference (distillation) forms its logits there, the teacher's
    # under no_grad: both are kept with their gradient, the loss's per-logit sensitivity.
    logits_of, logits = reference.reference_logits, []

    def keeping_logits(*args, **kwargs):
        with torch.enable_grad():
            z = logits_of(*args, **kwargs)
        if z.requires_grad:
            z.retain_grad()
            logits.append(z)
        return z

    with mock.patch.object(module, "materialise", keeping), \
            mock.patch.object(reference, "reference_logits", keeping_logits), \
            mock.patch.object(torch.Tensor, "detach", lambda self: self):
        loss, _ = recipe.unfused(opts)(lm, batch, ctx)
    loss.backward()

    with torch.no_grad():  # δ: the two implementations' values of the same inputs
        delta = _delta(lm, batch)
        # per token: Σ_v |∂L/∂z_tv| bounds |∂L/∂logp_t| + |∂L/∂lse_t|
        terms = [(delta, stats.logits.grad.abs().sum(-1), stats.logp) for stats in kept]
        terms += [(float((frozen["fused"][name] - x).abs().max()), x.grad.abs(), x)
                  for name, x in inputs.items() if x.grad is not None]
        if logits:  # δ of any model's log-probs (the policy's, the teacher's) for every logit
            delta_any = max([delta] + [_delta(m, batch) for m in models.values()])
            terms += [(delta_any, z.grad.abs(), z) for z in logits]
    first = sum(d * float(k.sum()) + C * U * float((k * x.detach().abs()).sum()) for d, k, x in terms)
    return [MARGIN * k * first for k in range(1, steps + 1)]


# Step-1 metrics that are token means of per-token terms; the others sum up to T terms a row.
TOKEN_MEANS = ("reward/mean", "kl/mean")


def metric_tolerances(argv: list[str], keys) -> dict[str, float]:
    """Bounds on ``|metric_fused − metric_unfused|`` at step 1 (the same weights) for the
    metrics built from log-probs: rewards, returns, KL terms, sequence log-probs.

    Each is a mean, over tokens or rows, of per-token terms made of the log-probs of the
    policy and of the frozen models with coefficients of size at most c = max(1, β): a token
    mean (``TOKEN_MEANS``) differs by at most c · (Σ_m δ_m + log2(n) · u · L) (n: the batch's
    scored tokens, L = max|ℓ|; the second term is a reordered sum's rounding), a mean of row
    sums (sequence log-probs, implicit rewards, REINFORCE's returns with γ ≤ 1) by T times
    that (T: the most scored tokens of a row).
    """
    recipe, opts, lm, batch, models = _first_batch(argv)
    with torch.no_grad():
        deltas = [_delta(m, batch) for m in (lm, *models.values())]
        logp = frozen_logprobs(lm, batch, "unfused")
    scored = D.IGNORE != batch["labels"]
    rows_tokens, tokens = float(scored.sum(-1).max()), float(scored.sum())
    c = max(1.0, float(opts.get("beta") or 0.0))
    per_token = c * (sum(deltas) + math.log2(tokens) * U * float(logp.abs().max()))
    return {key: MARGIN * per_token * (1 if key in TOKEN_MEANS else rows_tokens)
            for key in keys}
