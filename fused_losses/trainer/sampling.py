"""Where a step's batch comes from: a fixed data set today; generation from the policy for
on-policy objectives (GRPO) through the same interface.

A batch source gives each process its rows of the step's batch: right-padded ``input_ids``,
``attention_mask`` and Hugging Face ``labels``, plus whatever per-row tensors the objective
reads (precomputed ``ref_logprobs``; for GRPO the sampler's ``advantages``, ``rewards`` and
``old_logprobs``). Its ``state_dict`` goes into the checkpoint, so that a resumed run draws
exactly the batches the uninterrupted one would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from . import data as D
from .distributed import Processes



class BatchSource(Protocol):
    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's rows of the batch of optimizer step ``step`` (0-based), on the CPU."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same sequence of batches."""

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DatasetBatches:
    """Batches of a fixed data set. The global batch of a step is a pure function of the seed
    and the step (``data.batch_indices``), so there is no state to carry: a resumed run needs
    only the step. Each process takes an equal slice of the records."""

    data: D.Encoded
    batch_size: int  # records per step over all processes
    seed: int
    pad_id: int
    width: int  # rows per record
    procs: Processes

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        indices = D.batch_indices(len(self.data.rows), self.batch_size, step, self.seed)
        whole = D.collate(self.data, indices, self.pad_id)
        return D.split_rows(whole, self.procs.world, self.procs.rank, self.width)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def dataset_batches(cfg, lm, data: D.Encoded, enc: D.Encoder,
                    procs: Processes) -> BatchSource:
    """The default batch source of a recipe: the training set itself. (A sampler for an
    on-policy objective takes the same arguments: the policy ``lm`` to generate with, the
    encoded prompts, the tokenizer to decode completions and score them.)"""
    width = len(data.rows[0]) if data.rows else 1
    return DatasetBatches(data, cfg.batch_size, cfg.seed, enc.pad_id, width, procs)
