"""Checkpoints: resume after SIGKILL reproduces the uninterrupted run (GRPO's sampled completions
and a distillation teacher loaded again included); bad checkpoints are refused."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_losses.trainer import loop

from .trainer_helpers import losses, tiny_args, train_until_first_checkpoint

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
