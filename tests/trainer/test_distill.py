"""Distillation in the trainer: fused and unfused agree step by step, a resume after SIGKILL
is exact, a preset teacher is its own seeded model, and mistakes are one line and exit 2."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_losses.trainer import loop
from fused_losses.trainer.model import PRESETS, build_model
from fused_losses.trainer.recipes import distill

from .rounding import step_tolerances
from .test_cli import no_model, one_line_error  # noqa: F401 (no_model is a fixture)
from .trainer_helpers import TINY, losses, tiny_args

# Wider than the student (H = 48 vs 32), the same vocabulary; its head scaled so that its
# distributions are peaked (random init gives nearly uniform ones, and a near-zero loss).
TEACHER = dict(TINY["llama"], hidden_size=48, intermediate_size=96)
TEACHER_HEAD_SCALE = 30.0


def save_tiny(path, spec: dict, seed: int, head_scale: float = 1.0) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(head_scale)
    lm.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("teacher"), TEACHER, seed=1,
                     head_scale=TEACHER_HEAD_SCALE)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# β ≠ 0.5: the JSD is not symmetric in P and Q then, so swapped roles would show.
CASES = [{"beta": 0.3}, {"divergence": "forward_kl", "temperature": 2.0, "hard_weight": 0.5},
         {"divergence": "reverse_kl"}]


@pytest.mark.parametrize("flags", CASES, ids=["jsd-0.3", "forward_kl-t2-hard", "reverse_kl"])
def test_fused_and_unfused_agree_step_by_step(tmp_path, tok_cache, teacher, flags):
    """distill_loss on the two heads vs distill_loss_reference on both models' materialised
    logits: the same losses within the bound ``rounding.py`` derives, the same metrics."""
    argv = tiny_args(tmp_path / "f", "distill", impl="fused", teacher=teacher, **flags)
    fused = loop.train(loop.parse_args(argv))
    unfused = loop.train(loop.parse_args(
        tiny_args(tmp_path / "u", "distill", impl="unfused", teacher=teacher, **flags)))
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


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tok_cache, teacher):
    # The teacher is not in the checkpoint: the resumed run loads it again from --teacher.
    flags = dict(teacher=teacher, max_steps=24, save_every=4, batch_size=8)
    whole = tmp_path / "whole"
    loop.train(loop.parse_args(tiny_args(whole, "distill", **flags)))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fused_losses.train",
                             *tiny_args(killed, "distill", **flags)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # past the first checkpoint
        if (killed / "checkpoint.pt").exists() and metrics.exists() \
                and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + \
        proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 4 <= saved < flags["max_steps"]

    loop.train(loop.parse_args(tiny_args(killed, "distill", resume=True, **flags)))
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == \
        list(range(1, flags["max_steps"] + 1))
    torch.testing.assert_close(torch.tensor(losses(killed)), torch.tensor(losses(whole)),
                               rtol=0, atol=0)


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
    ({"teacher": "tiny-llama", "loss_kwargs": '{"softcap": 30}', "impl": "unfused"},
     "--impl unfused does not implement ['softcap']"),
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
