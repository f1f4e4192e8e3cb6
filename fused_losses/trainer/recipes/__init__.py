"""Objective recipes: everything the trainer knows about an objective, one entry each.

A ``Recipe`` (``_common.py``) is a table of small functions: the library objective, the data
kind, the fused and unfused loss steps, the item count the loss is divided by, the frozen
models and what the loss reads from them, state carried across steps, the batch source and
the flags it needs. The loop calls these and has no ``if objective == ...`` of its own; a new
objective is a new file here and one line in ``RECIPES``. See ``docs/trainer.md``.
"""
from __future__ import annotations

import inspect

from fused_losses import linear_logprobs

from . import distill, grpo, ift, kto, preference, reinforce, sft
from ._common import IGNORE, LossStep, ObjectiveState, Recipe, Stateless, precompute_reference

RECIPES: dict[str, Recipe] = {
    "sft": sft.RECIPE,
    "dpo": preference.DPO,
    "simpo": preference.SIMPO,
    "orpo": preference.ORPO,
    "cpo": preference.CPO,
    "dil": preference.DIL,
    "ift": ift.RECIPE,
    "reinforce": reinforce.RECIPE,
    "grpo": grpo.RECIPE,
    "kto": kto.RECIPE,
    "distill": distill.RECIPE,
}

# Options of the primitive every objective passes on (bias, backend, temperature, ...).
PRIMITIVE_OPTIONS = frozenset(
    name for name, p in inspect.signature(linear_logprobs).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY or name == "bias")


def keyword_defaults(recipe: Recipe) -> dict:
    """The objective's own keyword options and their defaults (what the user may set)."""
    return {name: p.default for name, p in inspect.signature(recipe.objective).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in recipe.provided}


def passed_on(recipe: Recipe) -> frozenset[str]:
    """The primitive's options the objective passes on: every one through its
    ``**primitive_options``, none for an objective without (``distill_loss`` names its own)."""
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD
                    for p in inspect.signature(recipe.objective).parameters.values())
    return PRIMITIVE_OPTIONS if takes_any else frozenset()


def options(recipe: Recipe, given: dict[str, object], impl: str) -> dict:
    """The objective's options from the user's ``given`` ones (keyed by the flag or key that
    gave them, e.g. ``{"--beta": 0.2, "value_mode": "sequence"}``), renamed to the
    objective's arguments and completed with its defaults.

    Raises ``ValueError`` naming the flag or key for one the objective does not take, or, for
    ``impl == "unfused"``, one the materialised step does not implement; or naming the
    options whose values the recipe's ``check_options`` refuses.
    """
    defaults, primitive = keyword_defaults(recipe), passed_on(recipe)
    chosen, unknown = {}, []
    for source, value in given.items():
        flag = source.startswith("--")
        label = source if flag else f"--loss-kwargs {source!r}"
        name = source[2:].replace("-", "_") if flag else source
        name = recipe.renames.get(name, name)
        if name in chosen:
            raise ValueError(f"{label} sets {name} a second time")
        if name in defaults or name in primitive:
            chosen[name] = value
        else:
            unknown.append(label)
    if unknown:
        also = f" and the primitive's {sorted(primitive)}" if primitive else ""
        raise ValueError(f"{', '.join(unknown)}: not an option of {recipe.objective.__name__} "
                         f"(it takes {sorted(defaults)}{also})")
    if impl == "unfused" and set(chosen) - recipe.unfused_options:
        raise ValueError(f"--impl unfused does not implement "
                         f"{sorted(set(chosen) - recipe.unfused_options)} for "
                         f"{recipe.objective.__name__}; it supports "
                         f"{sorted(recipe.unfused_options)}")
    opts = {**defaults, **chosen}
    problems = recipe.check_options(opts)
    if problems:
        raise ValueError("; ".join(problems))
    return opts


__all__ = ["IGNORE", "LossStep", "ObjectiveState", "PRIMITIVE_OPTIONS", "RECIPES", "Recipe",
           "Stateless", "keyword_defaults", "options", "precompute_reference"]
