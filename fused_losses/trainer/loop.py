"""The training loop: config, setup, data, model, optimizer, loop, eval, save.

    fused-losses train --objective dpo --compare --output-dir runs/dpo
    torchrun --nproc_per_node 2 -m fused_losses.train --objective sft --fsdp --output-dir runs/x

One file, read top to bottom. The loss is the only thing that differs between ``--impl fused``
and ``--impl unfused``: one function picked at setup (``losses.make_loss_step``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .._memory import reset_peak_rss, status_kib
from . import data as D
from . import losses as L

PRESETS = {
    # Random-weight models built from a config. V = 32000 so that the LM head dominates, as in
    # real LMs; the embedded tokenizer uses the first few hundred ids.
    "tiny-llama": dict(model_type="llama", vocab_size=32000, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=False),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=32000, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False),
}
CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# Config: one dataclass; the command line is generated from it, one flag per field
# ---------------------------------------------------------------------------------------------

def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    objective: str = _f(None, "training objective (required)", L.OBJECTIVES)
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
    divergence: str = _f(None, "sft f-divergence (default total_variation)")
    variant: str = _f(None, "dil variant (default lsif)")
    loss_kwargs: str = _f(None, "more keyword arguments for the objective, as inline JSON")
    reward_model: str = _f(None, "reinforce: directory of the SFT model giving token rewards")
    reward_ref: str = _f(None, "reinforce: reference model directory (default: the start policy)")
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


class TrainError(Exception):
    """A clear, user-facing error: the command prints it and exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-losses train",
                                     description="Train a causal LM with a fused loss.")
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, choices=meta["choices"],
                                help=meta["help"])
    return parser


def parse_args(argv: list[str]) -> Config:
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    problems = []
    if cfg.objective is None:
        problems.append("--objective is required")
    if cfg.output_dir is None:
        problems.append("--output-dir is required")
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "grad_clip", "weight_decay", "save_every", "eval_every", "warmup_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.grad_accum:
        problems.append(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum "
                        f"{cfg.grad_accum}")
    if cfg.objective == "reinforce" and not cfg.reward_model:
        problems.append("--objective reinforce needs --reward-model DIR (the SFT model whose "
                        "log-prob ratio to --reward-ref gives the token rewards)")
    try:
        loss_options(cfg)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        parser.error("; ".join(problems))
    return cfg


def to_argv(cfg: Config) -> list[str]:
    """The command line that gives back ``cfg`` (used by ``--compare`` for its two runs)."""
    argv = []
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.type == "bool":
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def loss_options(cfg: Config) -> dict:
    """Keyword arguments for the objective: the named flags, then --loss-kwargs."""
    opts = {k: getattr(cfg, k) for k in ("beta", "loss_type", "divergence", "variant")
            if getattr(cfg, k) is not None}
    if cfg.loss_kwargs:
        try:
            extra = json.loads(cfg.loss_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--loss-kwargs is not valid JSON ({err.msg})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--loss-kwargs must be a JSON object, got {cfg.loss_kwargs!r}")
        opts.update(extra)
    return opts


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

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
    except ValueError as err:  # the objectives name the bad option (e.g. --loss-type)
        print(f"fused-losses train: error: {err}", file=sys.stderr)
        return 2


def compare(cfg: Config) -> int:
    """Both implementations, one process each (so peak memory is each run's own), same seed
    and data; then the report. Runs one after the other so timings do not share cores."""
    from . import report

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("--compare runs its two trainings itself; start it without torchrun")
    out = Path(cfg.output_dir)
    for impl in ("fused", "unfused"):
        run = dataclasses.replace(cfg, compare=False, impl=impl, output_dir=str(out / impl))
        print(f"== {impl} ==", flush=True)
        code = subprocess.call([sys.executable, "-m", "fused_losses.train", *to_argv(run)])
        if code:
            print(f"fused-losses train: the {impl} run failed (exit {code})", file=sys.stderr)
            return code
    print(report.write_compare(out, cfg.objective))
    return 0


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

class Memory:
    """Peak memory of the training, in MB. CUDA: the allocator's peak. CPU: the peak RSS
    (``VmHWM``, reset here) above the RSS once the model is built, plus the model's weights:
    so weights, reference copies, gradients, optimizer state, activations and logits count,
    and the interpreter and the libraries the model class imported do not."""

    def __init__(self, device: torch.device, weights_bytes: int):
        self.device, self.weights_mb = device, weights_bytes / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        reset_peak_rss()  # so the peak is this run's (best effort)
        self.base = status_kib("VmRSS")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(status_kib("VmHWM") - self.base, 0) / 1024 + self.weights_mb


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def build_model(cfg: Config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed)  # same random weights for both implementations
    if cfg.model_config or cfg.model in PRESETS:
        spec = dict(PRESETS.get(cfg.model, {}))
        if cfg.model_config:
            text = cfg.model_config
            try:
                spec = json.loads(text if text.lstrip().startswith("{")
                                  else Path(text).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise TrainError(f"--model-config {text!r}: not a readable JSON file or "
                                 f"inline JSON ({err})") from None
        if "model_type" not in spec:
            raise TrainError("--model-config needs a 'model_type' (e.g. \"llama\", \"qwen2\")")
        spec = dict(spec)
        model_type = spec.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **spec)
        except ValueError as err:
            raise TrainError(f"--model-config: {err}") from None
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager"), None
    if Path(cfg.model).is_dir():
        lm = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True)
        return lm, _local_tokenizer(cfg.model)
    raise TrainError(f"--model {cfg.model!r} is neither a local directory nor a preset "
                     f"{sorted(PRESETS)}")


def _local_tokenizer(path: str):
    files = {p.name for p in Path(path).iterdir()}
    if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_frozen(path: str, like):
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise TrainError(f"{path!r} is not a model directory")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval() \
        .requires_grad_(False).to(like.device)


class PolicyLoss(torch.nn.Module):
    """The policy and its loss in one ``forward``. DDP and FSDP2 run their hooks around
    ``forward``: calling the loss here means FSDP2 has gathered the full head weight (a plain
    tensor, not a DTensor shard) when the fused loss reads it, and reduces its gradient."""

    def __init__(self, lm, loss_step):
        super().__init__()
        self.lm, self.loss_step = lm, loss_step

    def forward(self, batch, ctx):
        return self.loss_step(self.lm, batch, ctx)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train(cfg: Config) -> dict:
    # --- setup: processes, device, threads --------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    out = Path(cfg.output_dir)
    is_main = rank == 0  # only rank 0 writes files: the others hold the same numbers
    if cfg.batch_size % (cfg.grad_accum * world):
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum "
                         f"{cfg.grad_accum} x {world} processes")
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:
        raise TrainError(f"{ckpt_path} exists; pass --resume to continue it or choose another "
                         "--output-dir (nothing was changed)")
    if cfg.resume and not ckpt_path.exists():
        raise TrainError(f"--resume: no checkpoint at {ckpt_path}")
    resumed = load_checkpoint(ckpt_path, cfg) if cfg.resume else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.bf16)

    # --- model (built first: a local model directory may bring its tokenizer) -----------------
    lm, local_tok = build_model(cfg)
    lm.train()  # from_pretrained returns eval mode
    memory = Memory(device, sum(p.numel() * p.element_size() for p in lm.parameters()))

    # --- data ----------------------------------------------------------------------------------
    kind = "preference" if cfg.objective in L.PREFERENCE else "sft"
    tokenizer = local_tok or D.embedded_tokenizer(cfg.tokenizer_cache)
    enc = D.Encoder.make(tokenizer)
    if cfg.data:
        records = D.read_jsonl(cfg.data, kind)
        if cfg.eval_data:
            held_out = D.read_jsonl(cfg.eval_data, kind)
        else:
            if len(records) <= cfg.eval_size:
                raise TrainError(f"{cfg.data}: {len(records)} records leave none for training "
                                 f"after holding out --eval-size {cfg.eval_size}")
            records, held_out = records[:-cfg.eval_size], records[-cfg.eval_size:]
    else:
        records = D.default_records("train", kind, cfg.train_size)
        held_out = (D.read_jsonl(cfg.eval_data, kind) if cfg.eval_data
                    else D.default_records("eval", kind, cfg.eval_size))
    train_set = D.encode_records(records, kind, enc, cfg.max_length, cfg.too_long)
    eval_set = D.encode_records(held_out[:cfg.eval_size], kind, enc, cfg.max_length,
                                cfg.too_long)

    # --- reference models, loss, wrapping --------------------------------------------------
    vocab = lm.get_output_embeddings().weight.shape[0]
    if enc.vocab_size > vocab:
        raise TrainError(f"the tokenizer has {enc.vocab_size} ids but the model's vocabulary "
                         f"is {vocab}")
    lm.to(device)
    opts = loss_options(cfg)
    ref_lm = None
    if L.needs_reference(cfg.objective, opts):  # a frozen copy of the starting policy
        ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    reward_lms = None
    if cfg.objective == "reinforce":
        reward_ref = (load_frozen(cfg.reward_ref, lm) if cfg.reward_ref
                      else copy.deepcopy(lm).eval().requires_grad_(False))
        reward_lms = (load_frozen(cfg.reward_model, lm), reward_ref)
    init_lm = None  # REINFORCE's KL penalty is against the starting policy
    if cfg.objective == "reinforce" and opts.get("kl_coef", 0) > 0:
        init_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    if ref_lm is not None and cfg.precompute_ref:
        precompute_reference(ref_lm, (train_set, eval_set), out, cfg, enc.pad_id, rank, world)
        ref_lm = None  # the log-probs now travel with the batches
    if cfg.activation_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        loss_step = L.make_loss_step(cfg.objective, cfg.impl, opts)
    except ValueError as err:
        raise TrainError(str(err)) from None
    model = core = PolicyLoss(lm, loss_step)
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in lm.get_decoder().layers:
            fully_shard(layer)
        fully_shard(core)  # root: embeddings, final norm and the head weight the loss reads
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core)

    # --- optimizer and schedule --------------------------------------------------------------
    # fused=True: one kernel per step without the foreach path's parameter-sized temporaries,
    # which would otherwise be a large share of this small model's peak memory.
    optimizer = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") and not cfg.fsdp)

    def lr_at(step: int) -> float:  # multiplier of --lr: linear warm-up, then cosine
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = 0
    if resumed is not None:
        start = restore(resumed, core, optimizer, scheduler)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "metrics.jsonl", start)

    # --- helpers used by the loop ------------------------------------------------------------
    micro = cfg.batch_size // (cfg.grad_accum * world)  # records per micro-batch per process
    paired = kind == "preference"

    def context(batch, num_items):
        """What a loss needs besides the policy: the global normaliser, reference log-probs
        (computed by the same implementation as the policy's) and token rewards."""
        ctx = {"num_items": num_items}
        if "ref_logprobs" in batch:
            ctx["ref_logprobs"] = batch["ref_logprobs"]
        elif ref_lm is not None:
            with autocast:
                ctx["ref_logprobs"] = L.reference_logprobs(ref_lm, batch, cfg.impl)
        if reward_lms is not None:
            with autocast:
                ctx["rewards"] = (L.reference_logprobs(reward_lms[0], batch, cfg.impl)
                                  - L.reference_logprobs(reward_lms[1], batch, cfg.impl))
        if init_lm is not None:
            with autocast:
                ctx["init_logprobs"] = L.reference_logprobs(init_lm, batch, cfg.impl)
        return ctx

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out loss (mean over batches) and, for preference objectives, reward accuracy.
        Every process evaluates the whole held-out set (FSDP2 needs them all in step)."""
        core.eval()
        totals, batches = {}, 0
        n = len(eval_set.rows)
        size = min(max(micro, 1) * 2, n)
        for first in range(0, n - size + 1, size):
            batch = to_device(D.collate(eval_set, list(range(first, first + size)), enc.pad_id))
            with autocast:
                loss, metrics = core(batch, context(batch, L.items_in(cfg.objective, batch, opts)))
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            batches += 1
        core.train()
        return {f"eval/{k}": v / max(batches, 1) for k, v in totals.items()}

    # --- the loop ----------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (is_main and cfg.progress),
               dynamic_ncols=True, desc=f"{cfg.objective}/{cfg.impl}")
    timed_tokens, timed_seconds, last_eval = 0, 0.0, {}
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        batch = D.collate(train_set, D.batch_indices(len(train_set.rows), cfg.batch_size, step,
                                                     cfg.seed), enc.pad_id)
        # The loss divisor is the item count of the WHOLE step (all micro-batches, all
        # processes), so micro-batch gradients add up to the big-batch gradient exactly.
        num_items = L.items_in(cfg.objective, batch, opts)
        mine = D.split_rows(batch, world, rank, paired)
        step_loss = torch.zeros((), device=device)
        step_metrics: dict[str, torch.Tensor] = {}
        for k in range(cfg.grad_accum):
            part = to_device(D.split_rows(mine, cfg.grad_accum, k, paired))
            ctx = context(part, num_items)
            sync_gradients(model, last=k == cfg.grad_accum - 1)
            with autocast:
                loss, metrics = model(part, ctx)
            # DDP and FSDP2 average gradients over processes; the loss is already a share of
            # the global sum, so scale by the world size to get the sum back.
            (loss * world).backward()
            step_loss += loss.detach().float()
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value.detach().float() \
                    / (cfg.grad_accum * world)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            core.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # One host sync per step: gather the logged numbers from every process at once.
        logged = torch.stack([step_loss, *step_metrics.values()])
        if world > 1:
            dist.all_reduce(logged)
        logged = logged.tolist()
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        seconds = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum())
        if step > start:  # the first step pays one-off costs (allocations, thread start-up)
            timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + seconds
        record = {"step": step + 1, "loss": logged[0], "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens": tokens,
                  "tokens_per_s": tokens / seconds, "peak_memory_mb": memory.peak_mb(),
                  **dict(zip(step_metrics, logged[1:]))}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            last_eval = evaluate()
            record.update(last_eval)
        if is_main:
            with open(out / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}",
                        mem=f"{record['peak_memory_mb']:.0f}MB")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(ckpt_path, cfg, core, optimizer, scheduler, step + 1, is_main)
    bar.close()

    # --- eval and save ------------------------------------------------------------------------
    final_eval = evaluate()
    save_checkpoint(ckpt_path, cfg, core, optimizer, scheduler, cfg.max_steps, is_main)
    summary = {"objective": cfg.objective, "impl": cfg.impl, "device": str(device),
               "world_size": world, "fsdp": cfg.fsdp, "steps": cfg.max_steps,
               "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
               "model": describe_model(lm), "data": {"train": train_set.counts,
                                                     "eval": eval_set.counts},
               "peak_memory_mb": memory.peak_mb(),
               "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
               "torch_threads": torch.get_num_threads(), **final_eval}
    if is_main:
        save_final_model(lm, out / "final", core, cfg)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("objective", "impl", "peak_memory_mb",
                                                   "tokens_per_s")} | final_eval), flush=True)
    if world > 1:
        dist.barrier()
    return summary


@torch.no_grad()
def precompute_reference(ref_lm, datasets, out: Path, cfg, pad_id: int, rank: int, world: int):
    """Reference log-probs of every row, computed once and cached in the output directory
    (keyed by the implementation); each record's rows are padded alone, so the values do not
    depend on which batch a record later lands in."""
    path = out / f"ref_logprobs_{cfg.impl}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        for data, ref in zip(datasets, cached):
            data.ref = ref
        return
    device = next(ref_lm.parameters()).device
    for data in datasets:
        refs = []
        for index in range(len(data.rows)):
            batch = {k: v.to(device) for k, v in D.collate(data, [index], pad_id).items()}
            values = L.reference_logprobs(ref_lm, batch, cfg.impl).cpu()
            refs.append(tuple(values[k, :len(ids)].clone()
                              for k, (ids, _) in enumerate(data.rows[index])))
        data.ref = refs
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save([data.ref for data in datasets], tmp)
        os.replace(tmp, path)
    if world > 1:
        dist.barrier()


def sync_gradients(model, last: bool) -> None:
    """Reduce gradients across processes only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = last


def describe_model(lm) -> dict:
    config = lm.config
    return {"type": config.model_type, "vocab_size": lm.get_output_embeddings().weight.shape[0],
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "parameters": sum(p.numel() for p in lm.parameters())}


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, refused clearly when corrupted or from another run
# ---------------------------------------------------------------------------------------------

# Fields that change what a step computes; a checkpoint from a run that differs in one of them
# cannot be continued. (--max-steps may grow; logging and bar options do not matter.)
FINGERPRINT = ("objective", "impl", "model", "model_config", "data", "batch_size", "grad_accum",
               "max_length", "too_long", "train_size", "lr", "warmup_steps", "min_lr_ratio",
               "weight_decay", "grad_clip", "beta", "loss_type", "divergence", "variant",
               "loss_kwargs", "seed", "fsdp", "precompute_ref")


def _full_state(core, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(core, optimizer, options=opts)


def save_checkpoint(path: Path, cfg, core, optimizer, scheduler, step: int, is_main: bool):
    model_state, optim_state = _full_state(core, optimizer)  # collective under FSDP2
    if not is_main:
        return
    state = {"format": "fused-losses-trainer/1", "step": step, "model": model_state,
             "optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "config": {k: getattr(cfg, k) for k in FINGERPRINT},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                     else None},
             # The data order is a pure function of (seed, batch index): the position is `step`.
             "data_position": step}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, whole


def load_checkpoint(path: Path, cfg) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
        raise TrainError(f"{path} is corrupted or unreadable ({type(err).__name__}: {err}); "
                         "refusing to resume, nothing was changed") from None
    if not isinstance(state, dict) or state.get("format") != "fused-losses-trainer/1":
        raise TrainError(f"{path} is not a fused-losses trainer checkpoint; refusing to resume, "
                         "nothing was changed")
    mine = {k: getattr(cfg, k) for k in FINGERPRINT}
    diff = {k: (state["config"].get(k), v) for k, v in mine.items()
            if state["config"].get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise TrainError(f"{path} was written by an incompatible run ({listing}); refusing to "
                         "resume, nothing was changed")
    if state["step"] > cfg.max_steps:
        raise TrainError(f"{path} is at step {state['step']}, beyond --max-steps "
                         f"{cfg.max_steps}")
    return state


def restore(state: dict, core, optimizer, scheduler) -> int:
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
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def save_final_model(lm, path: Path, core, cfg) -> None:
    """The trained weights as a transformers directory (usable as --model or --reward-model)."""
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return  # the full state dict is in checkpoint.pt; save_pretrained needs local tensors
    lm.save_pretrained(path)
