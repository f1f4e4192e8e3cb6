"""The training loop, read top to bottom: set-up, model, data, objective, optimizer, loop,
eval, save.

    fused-losses train --objective dpo --compare --output-dir runs/dpo
    torchrun --nproc_per_node 2 -m fused_losses.train --objective sft --fsdp --output-dir runs/x

The parts live beside it: ``config`` (the flags), ``model``, ``data``, ``recipes`` (one entry
per objective: its data, loss steps fused and unfused, item count, frozen models, state),
``step`` (the optimisation step), ``sampling`` (where batches come from), ``checkpoint``,
``distributed``, ``report``. Fused vs unfused is one function picked at set-up; no line of
this file depends on which objective runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from . import data as D
from . import distributed, recipes, sampling
from .config import Config, loss_options, parse_args, to_argv
from .errors import TrainError
from .fileio import write_text_atomically
from .model import (Memory, PolicyLoss, build_model, describe_model,
                    enable_activation_checkpointing, save_final_model)
from .recipes import RECIPES
from .step import Step, make_optimizer

__all__ = ["Config", "main", "parse_args", "to_argv", "train", "compare"]


class Interrupted(Exception):
    """Ctrl-C during training: where the run stands, for the one line ``main`` prints."""

    def __init__(self, step: int, max_steps: int, saved: int | None, path: Path):
        super().__init__(step, max_steps, saved, path)
        self.step, self.max_steps, self.saved, self.path = step, max_steps, saved, path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except SystemExit as exit_:  # argparse: usage error (2) or --help (0)
        return int(exit_.code or 0)
    try:
        if cfg.compare:
            return compare(cfg)
        train(cfg)
        return 0
    except (TrainError, D.DataError) as err:
        print(f"fused-losses train: error: {err}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as err:  # the objectives name a bad option's value
        print(f"fused-losses train: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if stop.saved is None:
            where = "no checkpoint was written yet: run the same command to start over"
        else:
            resume = argv if "--resume" in argv else [*argv, "--resume"]
            where = (f"{stop.path} holds step {stop.saved}; continue with: "
                     f"{shlex.join(['fused-losses', 'train', *resume])}")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fused-losses train: interrupted after {stop.step} of {stop.max_steps} steps; "
                  f"{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step: nothing of this run was written
        print("fused-losses train: interrupted before training started", file=sys.stderr)
        return 130


def train(cfg: Config) -> dict:
    recipe = RECIPES[cfg.objective]
    opts = recipes.options(recipe, loss_options(cfg), cfg.impl)

    # --- processes, device, the run directory ----------------------------------------------
    procs = distributed.init(cfg.threads)
    if cfg.batch_size % (cfg.grad_accum * procs.world):
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum "
                         f"{cfg.grad_accum} x {procs.world} processes")
    out = Path(cfg.output_dir)
    resumed = checkpoint.for_resume(out, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=procs.device.type == "cuda" and cfg.bf16)

    # --- model (built first: a local model directory may bring its tokenizer) --------------
    lm, local_tokenizer = build_model(cfg.model, cfg.model_config, cfg.seed)
    recipes.check_head(lm, "--model-config" if cfg.model_config else "--model")
    lm.train()  # from_pretrained returns eval mode
    memory = Memory(procs.device, lm)

    # --- data -------------------------------------------------------------------------------
    enc = D.Encoder.make(local_tokenizer or D.embedded_tokenizer(cfg.tokenizer_cache))
    records, held_out = D.load_records(cfg.data, cfg.eval_data, recipe.data, cfg.train_size,
                                       cfg.eval_size)
    train_set = D.encode_records(records, recipe.data, enc, cfg.max_length, cfg.too_long)
    eval_set = D.encode_records(held_out, recipe.data, enc, cfg.max_length, cfg.too_long)
    vocab = lm.get_output_embeddings().weight.shape[0]
    if enc.vocab_size > vocab:
        raise TrainError(f"the tokenizer has {enc.vocab_size} ids but the model's vocabulary "
                         f"is {vocab}")
    lm.to(procs.device)

    # --- the objective: frozen models, loss step, state carried across steps ----------------
    models = recipe.frozen(cfg, lm, opts)  # copies of the start policy, reward models, ...
    if cfg.precompute_ref and "ref" in models:  # the log-probs travel with the batches instead
        recipes.precompute_reference(models.pop("ref"), (train_set, eval_set), out, cfg.impl,
                                     enc.pad_id, procs, opts.get("temperature", 1.0))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(lm)
    loss_step = (recipe.fused if cfg.impl == "fused" else recipe.unfused)(opts)
    state = recipe.state(opts)

    def context(batch: dict, num_items: int) -> dict:
        """What a loss reads besides the policy: the step's item count (its divisor), the
        frozen models' outputs (by the same implementation as the policy's), the state."""
        with autocast:
            return {"num_items": num_items, **recipe.context(models, batch, cfg.impl, opts),
                    **state.values()}

    # --- wrapping, optimizer, batches, resume -----------------------------------------------
    core = PolicyLoss(lm, loss_step)
    model = distributed.wrap(core, lm, cfg.fsdp, procs)
    optimizer, scheduler = make_optimizer(core, cfg, procs.device)
    source = recipe.sampler(cfg, lm, train_set, enc, procs, opts)
    eval_source = recipe.sampler(cfg, lm, eval_set, enc, procs, opts)
    width = len(D.RESPONSES[recipe.data])
    step_once = Step(model, core, optimizer, scheduler, context, state.update, autocast,
                     cfg.grad_accum, cfg.grad_clip, width, procs)
    start = 0
    if resumed:
        start = checkpoint.restore(resumed, core, optimizer, scheduler)
        state.load_state_dict(resumed.get("objective_state", {}))
        source.load_state_dict(resumed.get("batches", {}))
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.trim_metrics(out / "metrics.jsonl", start)

    def save(step: int) -> None:
        checkpoint.save(out / checkpoint.CHECKPOINT, cfg, core, optimizer, scheduler, step,
                        procs.is_main, {"objective_state": state.state_dict(),
                                        "batches": source.state_dict()})

    def evaluate() -> dict:
        micro = cfg.batch_size // (cfg.grad_accum * procs.world)  # records per micro-batch
        return step_once.evaluate(sampling.held_out(eval_source, eval_set, enc.pad_id, micro),
                                  lambda b: recipe.items(b, opts))

    # --- the loop ---------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (procs.is_main and cfg.progress),
               dynamic_ncols=True, desc=f"{cfg.objective}/{cfg.impl}")
    timed_tokens, timed_seconds, timed_training = 0, 0.0, 0.0
    saved, step = (start if resumed else None), start  # the step checkpoint.pt holds
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            batch = source.batch(step)
            sampled = time.perf_counter() - t0  # an on-policy source generates here
            # One sum over processes gives the step's item count (the loss divisor) and tokens.
            counts = torch.tensor([recipe.items(batch, opts), int(batch["attention_mask"].sum())])
            num_items, tokens = distributed.sum_over_processes(counts, procs).tolist()
            record = {"step": step + 1, **step_once(batch, num_items)}
            seconds = time.perf_counter() - t0
            if step > start:  # the first step pays one-off costs (allocations, threads)
                timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + seconds
                timed_training += seconds - sampled
            record.update(tokens=tokens, tokens_per_s=tokens / seconds,
                          train_tokens_per_s=tokens / (seconds - sampled),
                          peak_memory_mb=memory.peak_mb(), **sampling.stats(source))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
                record.update(evaluate())
            if procs.is_main:  # one line per step: a kill can tear only the last one
                with open(out / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}",
                            mem=f"{record['peak_memory_mb']:.0f}MB")
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                save(step + 1)
                saved = step + 1

        # --- eval and save --------------------------------------------------------------------
        step = cfg.max_steps
        final_eval = evaluate()
        save(cfg.max_steps)
        saved = cfg.max_steps
        summary = {"objective": cfg.objective, "impl": cfg.impl, "device": str(procs.device),
                   "world_size": procs.world, "fsdp": cfg.fsdp, "steps": cfg.max_steps,
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "model": describe_model(lm), "data": {"train": train_set.counts,
                                                         "eval": eval_set.counts},
                   "peak_memory_mb": memory.peak_mb(),
                   "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
                   "train_tokens_per_s": (timed_tokens / timed_training if timed_training
                                          else None),
                   "torch_threads": torch.get_num_threads(), **final_eval}
        if procs.is_main:
            save_final_model(lm, out / "final", sharded=cfg.fsdp and procs.world > 1)
            write_text_atomically(out / "summary.json", json.dumps(summary, indent=2))
            print(json.dumps({k: summary[k] for k in ("objective", "impl", "peak_memory_mb",
                                                       "tokens_per_s")} | final_eval), flush=True)
    except KeyboardInterrupt:  # every file is written whole or not at all: say where it stands
        raise Interrupted(step, cfg.max_steps, saved, out / checkpoint.CHECKPOINT) from None
    finally:
        bar.close()
    distributed.barrier(procs)
    return summary


def compare(cfg: Config) -> int:
    """Both implementations, one process each (so peak memory is each run's own), same seed
    and data; then the report. Runs one after the other so timings do not share cores."""
    from . import report

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("--compare runs its two trainings itself; start it without torchrun")
    out = Path(cfg.output_dir)
    for impl in ("fused", "unfused"):
        run = dataclasses.replace(cfg, compare=False, impl=impl, output_dir=str(out / impl),
                                  resume=cfg.resume and (out / impl / checkpoint.CHECKPOINT)
                                  .exists())
        print(f"== {impl} ==", flush=True)
        child = subprocess.Popen([sys.executable, "-m", "fused_losses.train", *to_argv(run)])
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the run too: it says where it stands
            child.wait()
            print(f"fused-losses train: --compare interrupted during the {impl} run; the same "
                  "command with --resume continues it", file=sys.stderr)
            return 130
        if code:
            print(f"fused-losses train: the {impl} run failed (exit {code})", file=sys.stderr)
            return code
    print(report.write_compare(out, cfg.objective))
    return 0
