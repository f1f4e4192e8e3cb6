"""The batch-source seam a sampler (GRPO's generation) plugs into: its state is checkpointed,
so a resumed run draws the batches the uninterrupted run drew."""
from __future__ import annotations

import dataclasses

import torch

from fused_losses.trainer import loop
from fused_losses.trainer import data as D
from fused_losses.trainer.recipes import RECIPES

from .trainer_helpers import losses, tiny_args, train_until_first_checkpoint


class DrawingSource:
    """Records drawn at random from a generator that is never reseeded: the next batch
    depends on every draw before it, as a sampler's generations do."""

    def __init__(self, cfg, lm, data, enc, procs, opts):
        self.data, self.size, self.pad_id = data, cfg.batch_size, enc.pad_id
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def batch(self, step):
        picks = torch.randint(len(self.data.rows), (self.size,), generator=self.generator)
        return D.collate(self.data, picks.tolist(), self.pad_id)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def test_a_samplers_state_survives_a_resume(tmp_path, tok_cache, monkeypatch):
    monkeypatch.setitem(RECIPES, "sft", dataclasses.replace(RECIPES["sft"],
                                                            sampler=DrawingSource))
    flags = dict(max_steps=4, save_every=2)
    loop.train(loop.parse_args(tiny_args(tmp_path / "whole", "sft", **flags)))

    train_until_first_checkpoint(tiny_args(tmp_path / "stopped", "sft", **flags), monkeypatch)
    loop.train(loop.parse_args(tiny_args(tmp_path / "stopped", "sft", resume=True, **flags)))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "stopped")),
                               torch.tensor(losses(tmp_path / "whole")), rtol=0, atol=0)
