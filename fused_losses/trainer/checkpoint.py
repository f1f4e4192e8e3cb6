"""Checkpoints: written atomically, refused clearly when corrupted or from another run.

``checkpoint.pt`` holds the full model and optimizer state (gathered to rank 0 under FSDP2),
the scheduler, the RNG states, the data position (the batch order is a pure function of seed
and step, so the position is the step), what the objective and the batch source carry across
steps (bco_pair's running δ; a sampler's state) and the run's fingerprint.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

from .config import Config
from .errors import TrainError
from .fileio import write_atomically, write_text_atomically

CHECKPOINT = "checkpoint.pt"
FORMAT = "fused-losses-trainer/1"
# Fields that change what a step computes; a checkpoint from a run that differs in one of them
# cannot be continued. (--max-steps may grow; logging and bar options do not matter.) The
# frozen models are fingerprinted by their flags (--reward-model, --reward-ref, --teacher),
# not their weights; --eval-data and --eval-size decide which of --data's records are
# trained on; --bf16 the step's arithmetic on CUDA.
FINGERPRINT = ("objective", "impl", "model", "model_config", "data", "eval_data", "eval_size",
               "batch_size", "grad_accum", "max_length", "too_long", "train_size", "lr",
               "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "beta", "loss_type",
               "divergence", "variant", "temperature", "hard_weight", "loss_kwargs",
               "reward_model", "reward_ref", "teacher", "num_generations",
               "max_completion_length", "seed", "fsdp", "precompute_ref", "bf16")


def for_resume(out: Path, cfg: Config) -> dict | None:
    """The checkpoint to continue from (``--resume``), or None for a fresh run; refuses a fresh
    run into a directory that holds one, and a missing, corrupted or foreign checkpoint."""
    path = out / CHECKPOINT
    if path.exists() and not cfg.resume:
        raise TrainError(f"{path} exists; pass --resume to continue it or choose another "
                         "--output-dir (nothing was changed)")
    if not cfg.resume:
        return None
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}")
    return load(path, cfg)


def _full_state(core, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(core, optimizer, options=opts)


def save(path: Path, cfg: Config, core, optimizer, scheduler, step: int, is_main: bool,
         carried: dict) -> None:
    """``carried``: the objective's state and the batch source's (their ``state_dict``s)."""
    model_state, optim_state = _full_state(core, optimizer)  # collective under FSDP2
    if not is_main:
        return
    state = {"format": FORMAT, "step": step, "model": model_state,
             "optimizer": optim_state, "scheduler": scheduler.state_dict(), **carried,
             "config": {k: getattr(cfg, k) for k in FINGERPRINT},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                     else None},
             # The data order is a pure function of (seed, batch index): the position is `step`.
             "data_position": step}
    # A kill or Ctrl-C leaves the old checkpoint or the new one, whole.
    write_atomically(path, lambda tmp: torch.save(state, tmp), sync=True)


def load(path: Path, cfg: Config) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
        raise TrainError(f"{path} is corrupted or unreadable ({type(err).__name__}: {err}); "
                         "refusing to resume, nothing was changed") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path} is not a fused-losses trainer checkpoint; refusing to resume, "
                         "nothing was changed")
    mine = {k: getattr(cfg, k) for k in FINGERPRINT}
    # A field the checkpoint lacks was added to the fingerprint after it was written: the run
    # that wrote it behaved as the field's default does.
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    theirs = {k: state["config"].get(k, defaults[k]) for k in FINGERPRINT}
    diff = {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise TrainError(f"{path} was written by an incompatible run ({listing}); refusing to "
                         "resume, nothing was changed")
    if state["step"] > cfg.max_steps:
        raise TrainError(f"{path} is at step {state['step']}, beyond --max-steps "
                         f"{cfg.max_steps}")
    return state


def restore(state: dict, core, optimizer, scheduler) -> int:
    """Load ``state`` into the run; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        set_state_dict(core, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as err:
        raise TrainError(f"the checkpoint does not fit this model ({err}); refusing to "
                         "resume") from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["data_position"]


def trim_metrics(path: Path, start: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone). A torn
    last line (the process was killed while writing it) is dropped too, and said so."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise TrainError(f"{path}:{number} is not a JSON record; refusing to resume "
                                 "(nothing was changed)") from None
            print(f"fused-losses train: dropped the torn last line of {path} (line {number}: "
                  "the run was killed while writing it)", file=sys.stderr)
            continue
        if record["step"] <= start:
            keep.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in keep))
