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
Each model's own logits: ``distill_loss`` takes a head bias for each model but one
temperature for both (the user's τ) and no soft-cap. A model's logit scale (Cohere's
``logit_scale``, Granite's ``logits_scaling``) is linear, so it is folded into that model's
hidden states and bias (:func:`own_head`), exactly; a soft-capped model (Gemma-2's
``final_logit_softcapping``), student or teacher, is refused at set-up.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

import fused_losses
from fused_losses.divergence import DIVERGENCES
from fused_losses.objectives.logprobs import causal_lm_head
from fused_losses.reference import distill_loss_reference

from ..errors import TrainError
from ..model import PRESETS, build_model
from ._common import Recipe, decode, head, load_frozen, materialise, shift, IGNORE
from .sft import items

TEACHER_SEED_OFFSET = 1  # a preset teacher is not the student's twin when both are one preset
UNFUSED_OPTIONS = frozenset({"divergence", "beta", "temperature", "hard_weight"})


class OwnHead(NamedTuple):
    """A model's own logits as ``hidden @ weight.T + bias`` (its logit scale folded in)."""

    hidden: torch.Tensor  # [B, T, H] the decoder's output divided by the head's temperature
    weight: torch.Tensor  # [V, H] in hidden's dtype
    bias: torch.Tensor | None  # [V] divided by the head's temperature, or None


def own_head(lm, hidden: torch.Tensor) -> OwnHead:
    """``lm``'s logits ``(hidden @ W.T + b) / t`` (``t``: 1 / its logit scale) written as
    ``(hidden / t) @ W.T + b / t``, so that ``distill_loss``'s shared temperature divides the
    model's own logits (and its hard term is the model's own cross-entropy). Differentiable
    through ``hidden``; a soft-cap is refused before (:func:`check_transform`)."""
    lm_head = head(lm, hidden)
    scale = lm_head.options.get("temperature", 1.0)
    bias = lm_head.options.get("bias")
    if scale == 1.0:
        return OwnHead(hidden, lm_head.weight, bias)
    return OwnHead(hidden / scale, lm_head.weight, None if bias is None else bias / scale)


def check_transform(model, flag: str) -> None:
    """Refuse a soft-capped model: ``distill_loss`` has no soft-cap, and the logits it would
    distil from (or into) would not be the model's."""
    softcap = causal_lm_head(model).options.get("softcap")
    if softcap is not None:
        raise TrainError(f"{flag}: {type(model).__name__} soft-caps its logits "
                         f"(final_logit_softcapping {softcap:g}) and distill_loss has no "
                         "soft-cap, so it would not distil the model's own distributions; use "
                         "a model without one")


def fused(opts):
    def step(lm, batch, ctx):
        student = own_head(lm, decode(lm, batch))
        out = fused_losses.distill_loss(student.hidden, student.weight, ctx["teacher_hidden"],
                                        ctx["teacher_weight"], batch["labels"],
                                        bias=student.bias, teacher_bias=ctx.get("teacher_bias"),
                                        num_items_in_batch=ctx["num_items"], **opts)
        return out.loss, dict(out.metrics)
    return step


def unfused(opts):
    hard_weight = opts["hard_weight"]
    implemented = {k: opts[k] for k in UNFUSED_OPTIONS}  # the others keep their defaults

    def step(lm, batch, ctx):
        hidden = decode(lm, batch)
        scored = (shift(batch["labels"]) != IGNORE).sum().clamp_min(1)
        metrics = {}
        if hard_weight:
            # The cross-entropy's metric, from logits formed and freed before the loss's own
            # (so it adds time, not peak memory): the reference returns only the total.
            with torch.no_grad():
                lm_head = head(lm, hidden)
                stats = materialise(hidden, lm_head.weight, batch["labels"], **lm_head.options)
                metrics["nll_loss"] = -stats.logp.sum() / scored
                del stats
        student = own_head(lm, hidden)
        loss = distill_loss_reference(student.hidden, student.weight, ctx["teacher_hidden"],
                                      ctx["teacher_weight"], batch["labels"], bias=student.bias,
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
    check_transform(lm, "--model-config" if cfg.model_config else f"--model {cfg.model}")
    teacher = load_teacher(cfg, lm)
    check_transform(teacher, f"--teacher {cfg.teacher}")
    vocab, teacher_vocab = (m.get_output_embeddings().weight.shape[0] for m in (lm, teacher))
    if teacher_vocab != vocab:
        raise TrainError(f"--teacher {cfg.teacher}: its vocabulary has {teacher_vocab} entries "
                         f"but the student's has {vocab}; distillation compares both models' "
                         "distributions over one vocabulary (use a teacher with the student's "
                         "tokenizer and head size)")
    return {"teacher": teacher}


@torch.no_grad()
def context(models, batch, impl, opts) -> dict:
    """The teacher's hidden states and head, its logit scale folded in (both implementations
    form its own logits from them)."""
    teacher = own_head(models["teacher"], decode(models["teacher"], batch))
    ctx = {"teacher_hidden": teacher.hidden, "teacher_weight": teacher.weight}
    if teacher.bias is not None:
        ctx["teacher_bias"] = teacher.bias
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
                provided=frozenset({"bias", "teacher_bias", "num_items_in_batch"}))
