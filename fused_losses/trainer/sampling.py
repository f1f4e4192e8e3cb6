"""Where a step's batch comes from: a fixed data set, or generation from the policy for
on-policy objectives (GRPO) through the same interface.

A batch source gives each process its rows of the step's batch: right-padded ``input_ids``,
``attention_mask`` and Hugging Face ``labels``, plus whatever per-row tensors the objective
reads (precomputed ``ref_logprobs``; for GRPO the sampler's ``rewards`` and ``advantages``).
Its ``state_dict`` goes into the checkpoint, so that a resumed run draws exactly the batches
the uninterrupted one would have drawn. Two methods are optional (see :func:`held_out` and
:func:`stats`): ``held_out`` gives the evaluation batches of a source built on the held-out
split (an on-policy source samples them), ``stats`` what making the latest batch cost
(generation time).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from . import data as D
from . import rewards as R
from .distributed import Processes
from .errors import TrainError


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


def held_out(source: BatchSource, data: D.Encoded, pad_id: int,
             micro: int) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches over the whole held-out split ``data`` (every process evaluates all
    of it): the source's own ``held_out(micro)`` when it has one (an on-policy source samples
    them), else consecutive batches of ``2 · micro`` records (the last partial one dropped)."""
    if hasattr(source, "held_out"):
        yield from source.held_out(micro)
        return
    size = min(max(micro, 1) * 2, len(data.rows))
    for first in range(0, len(data.rows) - size + 1, size):
        yield D.collate(data, list(range(first, first + size)), pad_id)


def stats(source: BatchSource) -> dict[str, float]:
    """What making the source's latest batch cost (its ``stats()``, when it has one)."""
    return source.stats() if hasattr(source, "stats") else {}


def dataset_batches(cfg, lm, data: D.Encoded, enc: D.Encoder, procs: Processes,
                    opts: dict) -> BatchSource:
    """The default batch source of a recipe: the training set itself. (A sampler for an
    on-policy objective takes the same arguments: the policy ``lm`` to generate with, the
    encoded prompts, the tokenizer to decode completions and score them, the objective's
    options, its sampling temperature among them.)"""
    width = len(data.rows[0]) if data.rows else 1
    return DatasetBatches(data, cfg.batch_size, cfg.seed, enc.pad_id, width, procs)


@dataclass
class GenerationBatches:
    """On-policy batches (GRPO): ``num_generations`` completions per prompt sampled from the
    policy, scored by ``rewards.reward`` and given group-normalised advantages.

    A step's prompts are a pure function of the seed and the step (``data.batch_indices``, as
    ``DatasetBatches``), and so is the sampling noise (a generator seeded from the seed, the
    step and the rank), so a batch depends only on the step and the policy's weights: a run
    resumed from a checkpoint samples exactly what the uninterrupted run sampled, and the
    fused and unfused runs sample the same completions while their weights agree (the
    ``samples/checksum`` metric shows it step by step). The state is that seed, checked on
    resume.
    """

    lm: torch.nn.Module
    prompts: list[list[int]]  # token ids of each record's prompt
    answers: list[int | None]  # the final number of each record's reference completion
    enc: D.Encoder
    batch_size: int  # prompts per step over all processes
    num_generations: int
    max_completion_length: int
    temperature: float  # the loss's (``sampling_temperature``): it scores what was sampled
    seed: int
    procs: Processes
    last: dict = field(default_factory=dict)  # what sampling the latest batch cost

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        chosen = D.batch_indices(len(self.prompts), self.batch_size, step, self.seed)
        share = self.batch_size // self.procs.world
        mine = chosen[self.procs.rank * share:(self.procs.rank + 1) * share]
        return self.sample(mine, ("train", self.seed, step, self.procs.rank))

    def held_out(self, micro: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every held-out prompt, ``2 · micro`` at a time, sampled with fixed seeds."""
        size = min(max(micro, 1) * 2, len(self.prompts))
        for first in range(0, len(self.prompts) - size + 1, size):
            yield self.sample(list(range(first, first + size)), ("held-out", self.seed, first))

    @torch.no_grad()
    def sample(self, indices: list[int], seed: tuple) -> dict[str, torch.Tensor]:
        """Right-padded rows prompt ⊕ completion (labels on the completion, its EOS
        included), the ``num_generations`` rows of a prompt adjacent, with per-row
        ``rewards`` and ``advantages``."""
        device = next(self.lm.parameters()).device
        width = max(len(self.prompts[i]) for i in indices)
        ids = torch.full((len(indices), width), self.enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):  # left-padded: every prompt ends where sampling starts
            ids[row, width - len(self.prompts[i]):] = torch.tensor(self.prompts[i])
            mask[row, width - len(self.prompts[i]):] = 1
        t0 = time.perf_counter()
        was_training = self.lm.training
        self.lm.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_seed_of(seed))
            # The whole distribution of the model's own logits divided by the loss's
            # temperature (top_k=0 turns off generate's default top-50), as TRL samples.
            out = self.lm.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                temperature=self.temperature, top_k=0, top_p=1.0,
                max_new_tokens=self.max_completion_length,
                num_return_sequences=self.num_generations, pad_token_id=self.enc.pad_id,
                eos_token_id=self.enc.eos_id)[:, width:].cpu()
        self.lm.train(was_training)
        seconds = time.perf_counter() - t0
        rows, rewards = [], []
        for row, tokens in enumerate(out.tolist()):
            record = indices[row // self.num_generations]
            if self.enc.eos_id in tokens:  # the completion ends at (and scores) its EOS
                tokens = tokens[:tokens.index(self.enc.eos_id) + 1]
            rows.append((self.prompts[record] + tokens, len(self.prompts[record])))
            text = self.enc.decode([t for t in tokens if t != self.enc.eos_id])
            rewards.append(R.reward(text, self.answers[record]))
        batch = D.collate(D.Encoded([(row,) for row in rows]), list(range(len(rows))),
                          self.enc.pad_id)
        batch["rewards"] = torch.tensor(rewards)
        batch["advantages"] = group_advantages(batch["rewards"], self.num_generations)
        generated = sum(len(ids) - start for ids, start in rows)
        self.last = {"generation/seconds": seconds, "generation/tokens": float(generated),
                     "samples/checksum": checksum(rows)}
        return batch

    def stats(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise TrainError(f"the checkpoint's sampler seed {state['seed']} is not this "
                             f"run's --seed {self.seed}")


def _seed_of(parts: tuple) -> int:
    """A 63-bit seed from a tuple, the same in every process and run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """``(r − mean) / (std + 1e-4)`` within each group of ``group`` adjacent rows (std with
    Bessel's correction): TRL's default ``scale_rewards="group"``."""
    grouped = rewards.view(-1, group)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + 1e-4)).reshape(-1)


def checksum(rows) -> float:
    """A number that changes when any sampled token does (the ``--compare`` report checks the
    two runs sampled the same completions with it)."""
    total = 0
    for ids, start in rows:
        for position, token in enumerate(ids[start:], 1):
            total = (total * 31 + token * position) % 1_000_003
    return float(total)


def sampling_temperature(opts: dict) -> float:
    """The temperature GRPO samples at: the loss's own ``temperature`` option (default 1), so
    that the loss and the reference score the distribution the completions came from (TRL
    samples at ``temperature`` and divides the logits of both by it)."""
    return float(opts.get("temperature", 1.0))


def generation_batches(cfg, lm, data: D.Encoded, enc: D.Encoder, procs: Processes,
                       opts: dict) -> GenerationBatches:
    """GRPO's batch source: the records' prompts, and as answers the final numbers of their
    reference completions; sampled at the loss's temperature."""
    prompts = [ids[:start] for ((ids, start),) in data.rows]
    answers = [R.final_number(enc.decode(ids[start:])) for ((ids, start),) in data.rows]
    return GenerationBatches(lm, prompts, answers, enc, cfg.batch_size, cfg.num_generations,
                             cfg.max_completion_length, sampling_temperature(opts), cfg.seed,
                             procs)
