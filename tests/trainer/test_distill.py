"""Distillation in the trainer: fused and unfused agree step by step, a preset teacher is its
own seeded model, and mistakes are one line and exit 2. (Its resume after SIGKILL is in
``test_checkpoint.py``.)"""
from __future__ import annotations

import json

import pytest
import torch

from fused_losses.trainer import loop
from fused_losses.trainer.model import PRESETS, build_model
from fused_losses.trainer.recipes import distill

from .rounding import step_tolerances
from .test_cli import no_model, one_line_error  # noqa: F401 (no_model is a fixture)
from .trainer_helpers import TEACHER, TINY, save_tiny, tiny_args


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# β ≠ 0.5: the JSD is not symmetric in P and Q then, so swapped roles would show.
# Granite: a student whose own logits are its head's divided by 4 (both steps once distilled
# the bare head's).
CASES = [{"beta": 0.3}, {"divergence": "forward_kl", "temperature": 2.0, "hard_weight": 0.5},
         {"divergence": "reverse_kl"}, {"arch": "granite", "hard_weight": 0.5}]


@pytest.mark.parametrize("flags", CASES, ids=["jsd-0.3", "forward_kl-t2-hard", "reverse_kl",
                                              "granite-student-hard"])
def test_fused_and_unfused_agree_step_by_step(tmp_path, tok_cache, tiny_teacher, flags):
    """distill_loss on the two heads vs distill_loss_reference on both models' materialised
    logits: the same losses within the bound ``rounding.py`` derives, the same metrics."""
    argv = tiny_args(tmp_path / "f", "distill", impl="fused", teacher=tiny_teacher, **flags)
    fused = loop.train(loop.parse_args(argv))
    unfused = loop.train(loop.parse_args(
        tiny_args(tmp_path / "u", "distill", impl="unfused", teacher=tiny_teacher, **flags)))
    a, b = records(tmp_path / "f"), records(tmp_path / "u")
    assert len(a) == len(b) == 3
    bounds = step_tolerances(argv, steps=4)
    for x, y, bound in zip(a, b, bounds):
        assert abs(x["loss"] - y["loss"]) <= bound, (x["step"], x["loss"], y["loss"], bound)
        assert abs(x["divergence"] - y["divergence"]) <= bound
        assert x.keys() == y.keys()
    assert abs(fused["eval/loss"] - unfused["eval/loss"]) <= bounds[3]
    assert fused.keys() == unfused.keys()
    assert ("eval/nll_loss" in fused) == ("hard_weight" in flags)
    assert a[0]["divergence"] > 0.05  # a peaked teacher: not the near-zero loss of two uniforms


def test_a_preset_teacher_is_its_own_seeded_model(monkeypatch):
    # Seeded --seed + 1: not the student's twin when both are one preset, the same model in
    # every run (a resumed run rebuilds it), and the student's random state is left alone.
    monkeypatch.setitem(PRESETS, "tiny-test", TINY["llama"])
    cfg = loop.Config(objective="distill", model="tiny-test", teacher="tiny-test", seed=3)
    student, _ = build_model("tiny-test", None, cfg.seed)
    state = torch.get_rng_state()
    first = distill.load_teacher(cfg, student)
    assert torch.equal(torch.get_rng_state(), state)
    second = distill.load_teacher(cfg, student)
    weight = lambda m: m.get_output_embeddings().weight  # noqa: E731
    assert torch.equal(weight(first), weight(second))
    assert not torch.equal(weight(first), weight(student))
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


@pytest.mark.parametrize("flags,message", [
    ({}, "--objective distill needs --teacher DIR|PRESET"),
    ({"teacher": "/no/such/teacher"}, "--teacher '/no/such/teacher' is neither a model "
                                      "directory nor a preset"),
    ({"teacher": "tiny-llama", "divergence": "kl"},
     "divergence 'kl': distill takes one of forward_kl, reverse_kl, jsd"),
    ({"teacher": "tiny-llama", "loss_kwargs": '{"divergence": "js"}', "compare": True},
     "divergence 'js': distill takes one of"),
    ({"teacher": "tiny-llama", "beta": 1.5}, "beta must be a number in [0, 1] for distill"),
    ({"teacher": "tiny-llama", "temperature": 0}, "temperature must be a finite number > 0"),
    ({"teacher": "tiny-llama", "hard_weight": "inf"}, "--hard-weight must be a finite number"),
    ({"teacher": "tiny-llama", "loss_kwargs": '{"softcap": 30}'},  # distill_loss has none
     "--loss-kwargs 'softcap': not an option of distill_loss"),
    ({"teacher": "tiny-llama", "loss_kwargs": '{"backend": "torch"}', "impl": "unfused"},
     "--impl unfused does not implement ['backend']"),
])
def test_mistakes_are_one_line_before_anything_is_built(tmp_path, capsys, no_model, flags,
                                                        message):
    assert loop.main(tiny_args(tmp_path / "run", "distill", **flags)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_teacher_of_another_vocabulary_is_refused_at_set_up(tmp_path, tok_cache, capsys):
    other = save_tiny(tmp_path / "teacher", dict(TEACHER, vocab_size=1030), seed=1)
    assert loop.main(tiny_args(tmp_path / "run", "distill", teacher=other)) == 2
    line = one_line_error(capsys)
    assert f"--teacher {other}: its vocabulary has 1030 entries but the student's has 1024" \
        in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_soft_capped_model_is_refused_at_set_up(tmp_path, tok_cache, tiny_teacher, capsys,
                                                  role):
    # distill_loss has no soft-cap: Gemma-2's capped logits cannot be distilled from or into
    # (both steps once used the bare head, silently).
    if role == "student":
        argv, flag = tiny_args(tmp_path / "run", "distill", arch="gemma2",
                               teacher=tiny_teacher), "--model-config"
    else:
        teacher = save_tiny(tmp_path / "teacher", TINY["gemma2"], seed=1)
        argv, flag = tiny_args(tmp_path / "run", "distill", teacher=teacher), f"--teacher {teacher}"
    assert loop.main(argv) == 2
    assert f"{flag}: Gemma2ForCausalLM soft-caps its logits (final_logit_softcapping 1) and " \
           "distill_loss has no soft-cap" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
