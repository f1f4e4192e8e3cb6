"""DDP and FSDP2 (2 gloo processes on CPU) give the losses of one process.

The fused loss runs inside the wrapped module's forward, so under FSDP2 it reads the full,
gathered head weight; a loss that read the sharded DTensor would fail or differ here.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fused_losses.trainer import loop

from .trainer_helpers import losses, tiny_args


@pytest.mark.parametrize("engine,objective,extra", [
    ("ddp", "sft", {}), ("fsdp", "dpo", {}),
    # bco_pair's delta folds in every rank's batch mean (TRL gathers them): the same as one
    # process's mean over the whole batch. Each rank's own mean would differ.
    pytest.param("ddp", "dpo", {"loss_type": "bco_pair"}, marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, tok_cache, engine, objective, extra):
    flags = dict(max_steps=3, batch_size=4, grad_accum=1, fsdp=engine == "fsdp", **extra)
    loop.train(loop.parse_args(tiny_args(tmp_path / "one", objective, **flags)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fused_losses.train", *tiny_args(tmp_path / "two", objective, **flags)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")),
                               torch.tensor(losses(tmp_path / "one")), rtol=1e-5, atol=1e-6)
    # Resume works from a checkpoint written by two processes (FSDP2: gathered to rank 0).
    assert (tmp_path / "two" / "checkpoint.pt").exists()
