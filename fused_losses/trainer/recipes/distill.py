"""Knowledge distillation from a frozen teacher (``objectives.md`` §9).

The teacher (``--teacher``) is a local transformers directory, or a preset with random
weights seeded ``--seed + 1`` (so a teacher of the student's own preset is another model).
Teacher and student may differ in H, each with its own head; their vocabularies must be the
same (a clear error at set-up otherwise: nothing is sliced). The teacher is frozen, its hidden
states are computed under ``no_grad``, and it is never checkpointed: ``--teacher`` is part of
the run's fingerprint, and a resumed run loads it again.
Data: prompt/completion records; the student learns the teacher's next-token distributions
on the completions of the data set (off-policy: GKD with λ = 0, no sampling).
Items: scored tokens (the loss is their mean of D + hard_weight·CE).
Unfused: ``reference.distill_loss_reference``, both models' logits materialised at every
position.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import fused_losses
from fused_losses.divergence import DIVERGENCES
from fused_losses.reference import distill_loss_reference

from ..errors import TrainError
from ..model import PRESETS, build_model
from ._common import Recipe, decode, head_weight, load_frozen, materialise, shift, IGNORE
from .sft import items

TEACHER_SEED_OFFSET = 1  # a preset teacher is not the student's twin when both are one preset
UNFUSED_OPTIONS = frozenset({"divergence", "beta", "temperature", "hard_weight"})


def fused(opts):
    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        out = fused_losses.distill_loss(hidden, head_weight(lm, hidden), ctx["teacher_hidden"],
                                        ctx["teacher_weight"], batch["labels"],
                                        teacher_bias=ctx.get("teacher_bias"),
                                        num_items_in_batch=ctx["num_items"], **opts)
        return out.loss, dict(out.metrics)
    return step


def unfused(opts):
    hard_weight = opts["hard_weight"]
    implemented = {k: opts[k] for k in UNFUSED_OPTIONS}  # the others keep their defaults

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        weight = head_weight(lm, hidden)
        scored = (shift(batch["labels"]) != IGNORE).sum().clamp_min(1)
        metrics = {}
        if hard_weight:
            # The cross-entropy's metric, from logits formed and freed before the loss's own
            # (so it adds time, not peak memory): the reference returns only the total.
            with torch.no_grad():
                stats = materialise(hidden, weight, batch["labels"])
                metrics["nll_loss"] = -stats.logp.sum() / scored
                del stats
        loss = distill_loss_reference(hidden, weight, ctx["teacher_hidden"],
                                      ctx["teacher_weight"], batch["labels"],
                                      teacher_bias=ctx.get("teacher_bias"),
                                      num_items_in_batch=ctx["num_items"], **implemented)
        total = loss.detach() * ctx["num_items"]  # Σ_t (D_t + hard_weight·CE_t)
        divergence = total - hard_weight * metrics["nll_loss"] * scored if hard_weight else total
        metrics["divergence"] = divergence / scored
        return loss, metrics
    return step


def load_teacher(cfg, lm):
    """The frozen teacher on the student's device: a preset (random weights, its own seed,
    the caller's random state untouched) or a local directory."""
    if cfg.teacher in PRESETS:
        # build_model seeds every device's generator: fork the student's device's too.
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            teacher, _ = build_model(cfg.teacher, None, cfg.seed + TEACHER_SEED_OFFSET)
        return teacher.eval().requires_grad_(False).to(lm.device)
    return load_frozen(cfg.teacher, lm, "--teacher")


def frozen(cfg, lm, opts) -> dict:
    teacher = load_teacher(cfg, lm)
    vocab, teacher_vocab = (m.get_output_embeddings().weight.shape[0] for m in (lm, teacher))
    if teacher_vocab != vocab:
        raise TrainError(f"--teacher {cfg.teacher}: its vocabulary has {teacher_vocab} entries "
                         f"but the student's has {vocab}; distillation compares both models' "
                         "distributions over one vocabulary (use a teacher with the student's "
                         "tokenizer and head size)")
    return {"teacher": teacher}


@torch.no_grad()
def context(models, batch, impl, opts) -> dict:
    """The teacher's hidden states and head (both implementations form its logits from them)."""
    teacher = models["teacher"]
    hidden = decode(teacher, batch)
    ctx = {"teacher_hidden": hidden, "teacher_weight": head_weight(teacher, hidden)}
    bias = getattr(teacher.get_output_embeddings(), "bias", None)
    if bias is not None:
        ctx["teacher_bias"] = bias.to(hidden.dtype)
    return ctx


def check(cfg) -> list[str]:
    if not cfg.teacher:
        return ["--objective distill needs --teacher DIR|PRESET (a local model directory, or a "
                f"preset {sorted(PRESETS)}), the frozen model to distil from"]
    if cfg.teacher not in PRESETS and not Path(cfg.teacher).is_dir():
        return [f"--teacher {cfg.teacher!r} is neither a model directory nor a preset "
                f"{sorted(PRESETS)}"]
    return []


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_options(opts) -> list[str]:
    """Values the materialised twin would not refuse (it treats an unknown divergence as JSD),
    refused before anything is built."""
    problems = []
    if opts["divergence"] not in DIVERGENCES:
        problems.append(f"divergence {opts['divergence']!r}: distill takes one of "
                        f"{', '.join(DIVERGENCES)}")
    if not (_finite(opts["beta"]) and 0 <= opts["beta"] <= 1):
        problems.append(f"beta must be a number in [0, 1] for distill, got {opts['beta']!r}")
    if not (_finite(opts["temperature"]) and opts["temperature"] > 0):
        problems.append(f"temperature must be a finite number > 0, got {opts['temperature']!r}")
    if not _finite(opts["hard_weight"]):
        problems.append(f"hard_weight must be a finite number, got {opts['hard_weight']!r}")
    return problems


RECIPE = Recipe(objective=fused_losses.distill_loss, data="sft", fused=fused, unfused=unfused,
                unfused_options=UNFUSED_OPTIONS,
                items=items, frozen=frozen, context=context, check=check,
                check_options=check_options,
                provided=frozenset({"teacher_bias", "num_items_in_batch"}))
