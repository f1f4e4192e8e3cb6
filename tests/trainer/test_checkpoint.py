"""Checkpoints: resume after SIGKILL reproduces the uninterrupted run (GRPO's sampled completions
and a distillation teacher loaded again included); bad checkpoints are refused."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_losses.trainer import checkpoint, loop
from fused_losses.trainer.errors import TrainError

from .trainer_helpers import TINY, losses, save_tiny, tiny_args, train_until_first_checkpoint

# Large enough that a step takes a noticeable time, so the kill lands mid-run.
SLOW = dict(max_steps=40, save_every=4, batch_size=8, max_length=200)
# GRPO samples every step: its batches depend on the weights, so the resumed run's losses
# and samples match only if the weights and the sampler's seeds come back exactly.
SLOW_GRPO = dict(SLOW, batch_size=2, num_generations=4, max_completion_length=8)
# Distillation's steps are slower (the teacher's forward): fewer of them do.
SLOW_DISTILL = dict(SLOW, max_steps=24)


@pytest.mark.parametrize("objective,flags", [("dpo", SLOW), ("grpo", SLOW_GRPO),
                                             ("distill", SLOW_DISTILL)])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tok_cache, request, objective,
                                                        flags):
    if objective == "distill":  # not in the checkpoint: the resumed run loads it again
        flags = dict(flags, teacher=request.getfixturevalue("tiny_teacher"))
    whole = tmp_path / "whole"
    loop.train(loop.parse_args(tiny_args(whole, objective, **flags)))

    killed = tmp_path / "killed"
    argv = tiny_args(killed, objective, **flags)
    proc = subprocess.Popen([sys.executable, "-m", "fused_losses.train", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 120
    # Kill once a checkpoint exists and the run has gone past it.
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoint.pt").exists() and metrics.exists() \
                and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + \
        proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    done = len(metrics.read_text().splitlines())
    assert 4 <= saved < flags["max_steps"] and done < flags["max_steps"]

    loop.train(loop.parse_args(tiny_args(killed, objective, resume=True, **flags)))
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, flags["max_steps"] + 1))
    torch.testing.assert_close(torch.tensor(losses(killed)), torch.tensor(losses(whole)),
                               rtol=0, atol=1e-6)
    uninterrupted = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    for key in ("grad_norm", "samples/checksum"):  # the checksum: GRPO's sampled completions
        assert [m.get(key) for m in logged] == [m.get(key) for m in uninterrupted], key


def test_corrupted_checkpoint_is_refused_and_left_alone(tmp_path, tok_cache, capsys):
    out = tmp_path / "run"
    loop.train(loop.parse_args(tiny_args(out, "sft", max_steps=2)))
    ckpt = out / "checkpoint.pt"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    before = (ckpt.read_bytes(), (out / "metrics.jsonl").read_bytes())
    assert loop.main(tiny_args(out, "sft", max_steps=4, resume=True)) == 2
    assert "corrupted or unreadable" in capsys.readouterr().err
    assert (ckpt.read_bytes(), (out / "metrics.jsonl").read_bytes()) == before


def test_incompatible_checkpoint_is_refused(tmp_path, tok_cache, capsys):
    out = tmp_path / "run"
    loop.train(loop.parse_args(tiny_args(out, "sft", max_steps=2)))
    before = (out / "checkpoint.pt").read_bytes()
    assert loop.main(tiny_args(out, "sft", max_steps=4, batch_size=8, resume=True)) == 2
    err = capsys.readouterr().err
    assert "incompatible run" in err and "batch_size" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    # A fresh run into a directory holding a checkpoint must not overwrite it either.
    assert loop.main(tiny_args(out, "sft", max_steps=4)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


# Config fields left out of the fingerprint: none changes what a training step computes.
# (A new field must be placed in one list or the other: the test below fails until it is.)
UNFINGERPRINTED = {
    "compare", "output_dir", "resume",  # where and how the run is started
    "max_steps",  # may grow: a finished run can be continued
    "eval_every", "save_every", "progress",  # when it evaluates, saves, draws the bar
    "activation_checkpointing",  # recomputes the same activations
    "tokenizer_cache",  # where the (deterministic) embedded tokenizer is kept
    "threads",  # CPU threads
}


def test_the_fingerprint_holds_every_field_that_changes_a_step():
    fields = {f.name for f in dataclasses.fields(loop.Config)}
    assert not set(checkpoint.FINGERPRINT) & UNFINGERPRINTED
    assert set(checkpoint.FINGERPRINT) | UNFINGERPRINTED == fields, \
        sorted(fields - set(checkpoint.FINGERPRINT) - UNFINGERPRINTED)


@pytest.mark.parametrize("field,value", [("reward_ref", "/runs/other-ref"), ("bf16", False),
                                         ("eval_size", 32), ("eval_data", "held-out.jsonl")])
def test_resume_refuses_a_checkpoint_of_other_frozen_models_or_data(tmp_path, field, value):
    cfg = loop.Config(objective="reinforce", output_dir=str(tmp_path), reward_model="/runs/sft")
    path = tmp_path / checkpoint.CHECKPOINT
    torch.save({"format": checkpoint.FORMAT, "step": 2,
                "config": {k: getattr(cfg, k) for k in checkpoint.FINGERPRINT}}, path)
    assert checkpoint.load(path, cfg)["step"] == 2
    with pytest.raises(TrainError, match=f"incompatible run \\({field}: checkpoint"):
        checkpoint.load(path, dataclasses.replace(cfg, **{field: value}))


def test_a_checkpoint_older_than_a_fingerprint_field_resumes_at_its_default(tmp_path):
    """A field added to the fingerprint after the checkpoint was written: the run that wrote
    it behaved as the default does, so a run at the default continues it; another value is
    refused."""
    cfg = loop.Config(objective="sft", output_dir=str(tmp_path))
    path = tmp_path / checkpoint.CHECKPOINT
    older = {k: getattr(cfg, k) for k in checkpoint.FINGERPRINT if k not in ("bf16", "eval_size")}
    torch.save({"format": checkpoint.FORMAT, "step": 2, "config": older}, path)
    assert checkpoint.load(path, cfg)["step"] == 2
    with pytest.raises(TrainError, match="incompatible run \\(eval_size: checkpoint 64"):
        checkpoint.load(path, dataclasses.replace(cfg, eval_size=32))


def test_resume_with_another_reward_model_is_refused(tmp_path, tok_cache, capsys):
    # REINFORCE's rewards are log-ratios of --reward-model to --reward-ref: a resumed run
    # scoring with another reward model was continued silently.
    first, other = (save_tiny(tmp_path / name, TINY["llama"], seed=seed)
                    for name, seed in (("sft", 1), ("other", 2)))
    out = tmp_path / "run"
    loop.train(loop.parse_args(tiny_args(out, "reinforce", reward_model=first, max_steps=1)))
    before = (out / checkpoint.CHECKPOINT).read_bytes()
    assert loop.main(tiny_args(out, "reinforce", reward_model=other, max_steps=2,
                               resume=True)) == 2
    err = capsys.readouterr().err
    assert f"incompatible run (reward_model: checkpoint {first!r} vs now {other!r})" in err
    assert (out / checkpoint.CHECKPOINT).read_bytes() == before


def test_resume_carries_the_objectives_state(tmp_path, tok_cache, monkeypatch):
    """bco_pair's running delta is in the checkpoint: a run stopped after step 2 and resumed
    gives the uninterrupted run's losses and deltas."""
    flags = dict(loss_type="bco_pair", max_steps=4, save_every=2)
    loop.train(loop.parse_args(tiny_args(tmp_path / "whole", "dpo", **flags)))

    train_until_first_checkpoint(tiny_args(tmp_path / "stopped", "dpo", **flags), monkeypatch)
    loop.train(loop.parse_args(tiny_args(tmp_path / "stopped", "dpo", resume=True, **flags)))
    for key in ("loss", "bco/delta", "bco/count"):
        a, b = (torch.tensor([json.loads(x)[key] for x in
                              (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
                for run in ("stopped", "whole"))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
