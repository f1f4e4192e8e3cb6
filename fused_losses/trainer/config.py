"""Configuration and command line: one dataclass, one flag per field, checked before any work.

``parse_args`` turns argv into a ``Config`` or exits 2 with one line naming the flag: nothing
is built, loaded or written before the whole command line is known to be usable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .model import PRESETS
from .recipes import RECIPES, options


# torch's CPU thread pool crashes (SIGSEGV) at absurd counts (100000); far fewer is already
# only a slowdown.
MAX_THREADS_PER_CORE = 16


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    objective: str = _f(None, "training objective (required)", tuple(RECIPES))
    impl: str = _f("fused", "loss implementation: fused, or unfused (materialised logits)",
                   ("fused", "unfused"))
    compare: bool = _f(False, "run fused and unfused (same seed and data), write report.md")
    model: str = _f("tiny-llama", f"local model directory or preset {sorted(PRESETS)}")
    model_config: str = _f(None, "transformers config as a JSON file or inline JSON (with "
                                 "model_type); random weights; overrides --model")
    data: str = _f(None, "JSONL with prompt/completion (sft, ift, reinforce) or "
                         "prompt/chosen/rejected (preference); default: embedded problems")
    eval_data: str = _f(None, "held-out JSONL; default: the embedded held-out split, or the "
                              "last --eval-size records of --data")
    output_dir: str = _f(None, "run directory: metrics.jsonl, checkpoint.pt, report (required)")
    max_steps: int = _f(60, "optimizer steps")
    batch_size: int = _f(8, "records (pairs for preference objectives) per optimizer step, "
                            "over all micro-batches and processes")
    grad_accum: int = _f(1, "micro-batches per optimizer step (per process)")
    max_length: int = _f(256, "longest sequence in tokens")
    too_long: str = _f("drop", "a record longer than --max-length is dropped, truncated or an "
                               "error (always counted in the report)", ("drop", "truncate", "error"))
    train_size: int = _f(2000, "records generated for the embedded default")
    eval_size: int = _f(64, "held-out records")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = _f(5, "linear warm-up steps, then cosine decay to --min-lr-ratio x lr")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    beta: float = _f(None, "objective's beta (ORPO: lambda); default: the objective's own")
    loss_type: str = _f(None, "dpo loss_type (default sigmoid)")
    divergence: str = _f(None, "sft f-divergence (default total_variation); distill: "
                               "forward_kl, reverse_kl or jsd (default jsd)")
    variant: str = _f(None, "dil variant (default lsif)")
    temperature: float = _f(None, "softmax temperature of the objective's logits (distill: of "
                                  "both models'; grpo: also the sampling temperature and the "
                                  "reference's; default 1)")
    hard_weight: float = _f(None, "distill: weight of the student's cross-entropy on the labels "
                                  "(default 0)")
    loss_kwargs: str = _f(None, "more keyword arguments for the objective, as inline JSON")
    reward_model: str = _f(None, "reinforce: directory of the SFT model giving token rewards")
    reward_ref: str = _f(None, "reinforce: reference model directory (default: the start policy)")
    teacher: str = _f(None, "distill: the frozen teacher, a local model directory or a preset "
                            f"{sorted(PRESETS)} (random weights seeded --seed + 1); its "
                            "vocabulary must be the student's")
    num_generations: int = _f(4, "grpo: completions sampled per prompt (the group)")
    max_completion_length: int = _f(64, "grpo: most tokens sampled per completion (also the "
                                        "divisor of loss_type dr_grpo)")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end)")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    resume: bool = _f(False, "continue from OUTPUT_DIR/checkpoint.pt")
    seed: int = _f(0, "seed for weights and data order")
    fsdp: bool = _f(False, "under torchrun: FSDP2 (fully_shard) instead of DDP")
    precompute_ref: bool = _f(False, "compute reference log-probs once per dataset (cached in "
                                      "OUTPUT_DIR) and free the reference model")
    activation_checkpointing: bool = _f(False, "recompute decoder layers in backward")
    bf16: bool = _f(True, "bf16 autocast on CUDA (CPU always runs fp32)")
    tokenizer_cache: str = _f(None, "where the embedded tokenizer is cached "
                                    "(default $FUSED_LOSSES_CACHE or ~/.cache/fused_losses)")
    threads: int = _f(None, "torch CPU threads per process (default: cores / processes)")
    progress: bool = _f(True, "tqdm progress bar")


def flag(name: str) -> str:
    """The command-line spelling of a ``Config`` field."""
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (its usage block runs to 25 lines)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fused-losses train",
                     description="Train a causal LM with a fused loss.")
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                                default=f.default, help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag(f.name), type=kind, default=f.default,
                                choices=meta["choices"], help=meta["help"])
    return parser


def parse_args(argv: list[str]) -> Config:
    """The ``Config`` of a command line, or ``SystemExit(2)`` after one line naming each bad
    flag (argparse's usage error). Nothing is built or written first."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    problems = []
    if cfg.objective is None:
        problems.append("--objective is required")
    if cfg.output_dir is None:
        problems.append("--output-dir is required")
    else:
        problems += folder_problems("--output-dir", cfg.output_dir)
    if cfg.tokenizer_cache is not None:
        problems += folder_problems("--tokenizer-cache", cfg.tokenizer_cache)
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_size",
                 "train_size", "num_generations", "max_completion_length"):
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_every", "eval_every", "warmup_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "beta", "temperature",
                 "hard_weight"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            problems.append(f"{flag(name)} must be a finite number >= 0, got {value}")
    most_threads = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if cfg.threads is not None and not 1 <= cfg.threads <= most_threads:
        problems.append(f"--threads must be in [1, {most_threads}] ({MAX_THREADS_PER_CORE} per "
                        f"core), got {cfg.threads}")
    if cfg.grad_accum >= 1 and cfg.batch_size % cfg.grad_accum:
        problems.append(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum "
                        f"{cfg.grad_accum}")
    if cfg.objective is not None:
        recipe = RECIPES[cfg.objective]
        problems += recipe.check(cfg)
        for name in sorted(set().union(*(r.own_flags for r in RECIPES.values()))
                           - recipe.own_flags):
            if getattr(cfg, name) is not None:
                readers = sorted(o for o, r in RECIPES.items() if name in r.own_flags)
                problems.append(f"{flag(name)} is read only by --objective "
                                f"{' or '.join(readers)}, not {cfg.objective}")
        try:  # --compare runs the unfused implementation too
            options(recipe, loss_options(cfg), "unfused" if cfg.compare else cfg.impl)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        parser.error("; ".join(problems))
    return cfg


def folder_problems(name: str, path: str) -> list[str]:
    """Why ``path`` cannot be (or become) the folder of flag ``name`` (the run directory, the
    tokenizer cache): a file, under a file, or in a folder that cannot be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        return [f"{name} {path} is a file, not a directory"]
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                return [f"{name} {path} is under {folder}, which is a file"]
            if not os.access(folder, os.W_OK | os.X_OK):
                return [f"{name} {path}: {folder} is not writable"]
            return []
    return []


def to_argv(cfg: Config) -> list[str]:
    """The command line that gives back ``cfg`` (used by ``--compare`` for its two runs)."""
    argv = []
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.type == "bool":
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a finite number", name, 0)


def loss_options(cfg: Config) -> dict:
    """The objective's options the user gave, keyed by where they came from: the named flags
    (``"--beta"``), then the keys of --loss-kwargs. ``recipes.options`` checks and completes
    them."""
    named = ("beta", "loss_type", "divergence", "variant", "temperature", "hard_weight",
             *RECIPES[cfg.objective].flags)
    opts = {flag(k): getattr(cfg, k) for k in named if getattr(cfg, k) is not None}
    if cfg.loss_kwargs:
        try:
            extra = json.loads(cfg.loss_kwargs, parse_constant=_no_constant)
        except json.JSONDecodeError as err:
            raise ValueError(f"--loss-kwargs is not valid JSON ({err.msg})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--loss-kwargs must be a JSON object, got {cfg.loss_kwargs!r}")
        opts.update(extra)
    return opts
