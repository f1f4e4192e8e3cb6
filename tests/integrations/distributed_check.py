"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): a patched model under DDP and
FSDP2, patched before and after wrapping, gives the one-process loss and gradients.

Each rank scores half of the batch with ``num_items_in_batch`` = the global count, times
the world size (DDP and FSDP2 average gradients; HF Trainer scales the same way), for three
SGD steps; rank 0 compares every step's summed loss and the final weights with one process
running the stock model on the whole batch. Prints ``OK <variant>`` per variant.
"""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from fused_losses import patch_causal_lm  # noqa: E402
from tests.integrations.models import build, hf_loss, model_inputs  # noqa: E402

STEPS, LR = 3, 0.5


def wrap(model, engine):
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)  # root: embeddings, final norm and the head


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def one_process(arch):
    model = build(arch)
    inputs, labels = model_inputs(arch, batch=4)
    losses = []
    for _ in range(STEPS):
        loss = hf_loss(model(**inputs).logits, labels)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def distributed(arch, engine, order):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(arch)
    model = wrap(patch_causal_lm(model), engine) if order == "patch_first" \
        else patch_causal_lm(wrap(model, engine))
    inputs, labels = model_inputs(arch, batch=4)
    count = (labels[:, 1:] != -100).sum()
    mine = slice(2 * rank, 2 * rank + 2)
    losses = []
    for _ in range(STEPS):
        out = model(**{k: v[mine] for k, v in inputs.items()}, labels=labels[mine],
                    num_items_in_batch=count)
        assert out.logits is None
        (out.loss * world).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        total = out.loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    inner = model.module if engine == "ddp" else model
    return losses, {n: full(p.detach()) for n, p in inner.named_parameters()}


def main():
    dist.init_process_group("gloo")
    arch = "llama_tied"  # tied head: the loss's dW and the embedding's meet in one gradient
    expected_losses, expected_weights = one_process(arch)
    for engine in ("ddp", "fsdp2"):
        for order in ("patch_first", "wrap_first"):
            losses, weights = distributed(arch, engine, order)
            if dist.get_rank() == 0:
                torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses),
                                           rtol=1e-9, atol=1e-9)
                for name, weight in weights.items():
                    torch.testing.assert_close(weight, expected_weights[name], rtol=1e-9,
                                               atol=1e-9, msg=lambda m: f"{name}: {m}")
                print(f"OK {engine} {order}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
