"""Distributed set-up: processes, device and threads; DDP or FSDP2 around the policy; sums
over processes.

One process is the same program with ``world == 1``: every helper here is then a no-op, so
the loop has no ``if distributed`` branches of its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    world: int  # processes in the run (torchrun's WORLD_SIZE; 1 without torchrun)
    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:  # only rank 0 writes files: the others hold the same numbers
        return self.rank == 0


def init(threads: int | None) -> Processes:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), pick the device and share the
    CPU cores between the processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    return Processes(world, rank, device)


def wrap(core: torch.nn.Module, lm, fsdp: bool, procs: Processes) -> torch.nn.Module:
    """The module the loop calls: ``core`` itself, DDP around it, or FSDP2 units (each decoder
    layer, then the root holding the embeddings, final norm and the head weight the loss
    reads)."""
    if procs.world == 1:
        return core
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in lm.get_decoder().layers:
            fully_shard(layer)
        fully_shard(core)
        return core
    return torch.nn.parallel.DistributedDataParallel(core)


def sync_gradients(model, last: bool) -> None:
    """Reduce gradients across processes only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = last


def sum_over_processes(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    """``values`` summed over every process (in place; unchanged with one process)."""
    if procs.world > 1:
        dist.all_reduce(values)
    return values


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()
