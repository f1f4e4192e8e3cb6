"""The optimisation step: AdamW and its schedule, one step over micro-batches and processes,
and the held-out evaluation (the same forward without backward).

The loss divisor is the item count of the WHOLE step (all micro-batches, all processes), so
micro-batch gradients add up to the big-batch gradient exactly; DDP and FSDP2 average
gradients over processes, so each loss is multiplied by the world size to get the sum back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import data as D
from .config import Config
from .distributed import Processes, sum_over_processes, sync_gradients


def make_optimizer(core: torch.nn.Module, cfg: Config, device: torch.device):
    """AdamW with a linear warm-up then a cosine decay to ``min_lr_ratio x lr``."""
    # fused=True: one kernel per step without the foreach path's parameter-sized temporaries,
    # which would otherwise be a large share of this small model's peak memory.
    optimizer = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") and not cfg.fsdp)

    def lr_at(step: int) -> float:  # multiplier of --lr
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


@dataclass
class Step:
    """One optimizer step; everything it uses is built once at set-up."""

    model: torch.nn.Module  # what forward runs on: the core, or DDP/FSDP2 around it
    core: torch.nn.Module  # the PolicyLoss whose parameters the optimizer holds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    context: Callable[[dict, int], dict]  # (micro-batch, items in the step) -> the loss's ctx
    observe: Callable[[dict], None]  # the objective's state takes each training forward's metrics
    autocast: torch.autocast
    grad_accum: int
    grad_clip: float  # 0: off
    width: int  # rows per record: a record's rows stay in one micro-batch
    procs: Processes

    def __call__(self, batch: dict[str, torch.Tensor], num_items: int) -> dict[str, float]:
        """Forward and backward over the micro-batches of this process's ``batch``, then the
        optimizer; returns the loss and metrics summed over processes (one host sync)."""
        device, world = self.procs.device, self.procs.world
        step_loss = torch.zeros((), device=device)
        step_metrics: dict[str, torch.Tensor] = {}
        for k in range(self.grad_accum):
            part = to_device(D.split_rows(batch, self.grad_accum, k, self.width), device)
            ctx = self.context(part, num_items)
            sync_gradients(self.model, last=k == self.grad_accum - 1)
            with self.autocast:
                loss, metrics = self.model(part, ctx)
            self.observe(metrics)
            (loss * world).backward()
            step_loss += loss.detach().float()
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value.detach().float() \
                    / (self.grad_accum * world)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.core.parameters(), self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logged = sum_over_processes(torch.stack([step_loss, *step_metrics.values()]),
                                    self.procs).tolist()
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        return {"loss": logged[0], "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), **dict(zip(step_metrics, logged[1:]))}

    @torch.no_grad()
    def evaluate(self, held_out: Iterable[dict[str, torch.Tensor]],
                 items: Callable[[dict], int]) -> dict[str, float]:
        """Held-out loss (mean over batches) and the objective's metrics. Every process
        evaluates the whole held-out set (FSDP2 needs them all in step)."""
        self.core.eval()
        totals, batches = {}, 0
        for batch in held_out:
            batch = to_device(batch, self.procs.device)
            with self.autocast:
                loss, metrics = self.core(batch, self.context(batch, items(batch)))
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            batches += 1
        self.core.train()
        return {f"eval/{k}": v / max(batches, 1) for k, v in totals.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
