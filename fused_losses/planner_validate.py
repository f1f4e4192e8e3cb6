"""Check the planner's loss/head term against measured peak memory on CPU.

    python -m fused_losses.planner_validate            # the trainer-sized grid, a table
    python -m fused_losses.planner_validate --json out.json
    python -m fused_losses.planner_validate --cuda     # Triton backend, bf16, on a GPU

Each case runs in its own subprocess: build the head's inputs (hidden [M, H] and weight
[V, H], both requiring grad, as the decoder and ``lm_head`` give them), reset the kernel's
high-water mark (``5 > /proc/self/clear_refs``), run the loss forward and backward exactly as
the trainer's two paths do, and read ``VmHWM`` from ``/proc/self/status``. The measured head
memory is ``VmHWM`` minus the resident size at the reset; it includes dW and dH, as the
planner's :func:`~fused_losses.planner.head_bytes` does.

glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, which would make
RSS lag behind what is live; the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so every
tensor of 64 KiB or more is its own mapping and is returned on free, as CUDA's caching
allocator's ``max_memory_allocated`` would count it. Linux only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

from ._memory import reset_peak_rss, status_kib
from .planner import head_bytes

# The trainer's tiny preset (H 256, V 32000) at the batches it runs (M = sequences x length
# rows, about 60% of them scored after prompts and padding), and larger heads. The first four
# shapes were measured while writing head_bytes (its chunk terms were fitted to them); the
# "held-out" shapes were added afterwards and checked without changing the formula.
FIT_SHAPES = ((1024, 256, 32000, "float32"), (4096, 256, 32000, "float32"),
              (2048, 512, 50257, "float32"), (2048, 256, 32000, "bfloat16"))
HELD_OUT_SHAPES = ((256, 256, 32000, "float32"), (3072, 384, 65536, "float32"),
                   (1536, 512, 50257, "bfloat16"))
CASES = [
    dict(path=path, impl=impl, rows=rows, hidden=hidden, vocab=vocab, dtype=dtype,
         held_out=shape in HELD_OUT_SHAPES)
    for shape in FIT_SHAPES + HELD_OUT_SHAPES
    for impl in ("unfused", "fused")
    for path in ("logprobs", "ce")
    for rows, hidden, vocab, dtype in (shape,)
]
# On a GPU (--cuda; not run in this repository's CI, which has none): the Triton backend in
# bf16 at LM-head shapes of 1B-8B models, against torch.cuda.max_memory_allocated.
CUDA_CASES = [
    dict(path=path, impl=impl, rows=rows, hidden=hidden, vocab=vocab, dtype="bfloat16",
         device="cuda", backend="triton", held_out=True)
    for rows, hidden, vocab in ((8192, 2048, 128256), (16384, 4096, 128256),
                                (8192, 2304, 256000))
    for impl in ("unfused", "fused")
    for path in ("logprobs", "ce")
]
SCORED_FRACTION = 0.6


def predict(case: dict) -> int:
    scored = _scored_rows(case["rows"])
    return head_bytes(case["impl"], rows=case["rows"], scored=scored, hidden=case["hidden"],
                      vocab=case["vocab"], dtype_bytes=2 if case["dtype"] == "bfloat16" else 4,
                      backend=case.get("backend", "torch"), path=case["path"])


def _scored_rows(rows: int) -> int:
    return int(rows * SCORED_FRACTION)


def _run_head(case: dict, torch, rows: int | None = None) -> tuple:
    import fused_losses
    from fused_losses.reference import (linear_cross_entropy_reference,
                                        linear_logprobs_reference)

    dtype = getattr(torch, case["dtype"])
    m = rows or case["rows"]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(m, case["hidden"], generator=g) / case["hidden"] ** 0.25).to(dtype)
    weight = (torch.randn(case["vocab"], case["hidden"], generator=g)
              / case["hidden"] ** 0.25).to(dtype)
    targets = torch.randint(0, case["vocab"], (m,), generator=g)
    targets[_scored_rows(m):] = -100
    coef = torch.randn(m, generator=g)
    device = case.get("device", "cpu")
    hidden, weight, targets, coef = (t.to(device) for t in (hidden, weight, targets, coef))
    hidden.requires_grad_()
    weight.requires_grad_()
    gc.collect()
    return hidden, weight, targets, coef, (fused_losses, linear_cross_entropy_reference,
                                           linear_logprobs_reference)


def _loss(case, hidden, weight, targets, coef, fns):
    fused_losses, ce_ref, lp_ref = fns
    fused = case["impl"] == "fused"
    backend = case.get("backend", "torch")
    if case["path"] == "ce":
        ce = fused_losses.linear_cross_entropy if fused else ce_ref
        kwargs = dict(backend=backend) if fused else {}
        return ce(hidden, weight, targets, **kwargs)
    if fused:
        lp = fused_losses.linear_logprobs(hidden, weight, targets, backend=backend).logprobs
    else:
        lp = lp_ref(hidden, weight, targets).logprobs
    return (lp.float() * coef).sum()


def measure_here(case: dict) -> int:
    """Peak head bytes in this process (call in a fresh child; see module docstring)."""
    import torch

    torch.set_num_threads(1)
    # Warm-up at a small size: lazy library initialisation is not head memory.
    warm = _run_head(case, torch, rows=64)
    _loss(case, *warm).backward()
    del warm
    inputs = _run_head(case, torch)
    gc.collect()
    if case.get("device", "cpu") == "cuda":  # the caching allocator's own count
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _loss(case, *inputs).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not reset_peak_rss():
        raise RuntimeError("cannot write /proc/self/clear_refs: no peak RSS to measure")
    base = status_kib("VmRSS")
    loss = _loss(case, *inputs)
    loss.backward()
    peak = status_kib("VmHWM")
    return (peak - base) * 1024


def measure(case: dict) -> int:
    """Run :func:`measure_here` in a fresh subprocess; returns bytes."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "fused_losses.planner_validate", "--child",
                          json.dumps(case)], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def validate(cases=CASES, echo=print) -> list[dict]:
    results = []
    echo(f"{'impl':<8}{'path':<10}{'M':>6}{'H':>5}{'V':>7} {'dtype':<9}"
         f"{'predicted MiB':>14}{'measured MiB':>14}{'error':>8}  set")
    for case in cases:
        predicted, measured = predict(case), measure(case)
        error = (predicted - measured) / measured
        results.append(dict(case, predicted=predicted, measured=measured, error=error))
        echo(f"{case['impl']:<8}{case['path']:<10}{case['rows']:>6}{case['hidden']:>5}"
             f"{case['vocab']:>7} {case['dtype']:<9}{predicted / 2**20:>14.1f}"
             f"{measured / 2**20:>14.1f}{error:>+8.1%}  "
             f"{'held-out' if case.get('held_out') else 'fit'}")
    for name, subset in (("all", results), ("held-out", [r for r in results
                                                            if r.get("held_out")])):
        if subset:
            worst = max(abs(r["error"]) for r in subset)
            echo(f"largest |error| ({name}): {worst:.1%} over {len(subset)} cases")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--cuda", action="store_true",
                        help="validate the Triton backend on the GPU (CUDA_CASES) instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(measure_here(json.loads(args.child)))
        return 0
    results = validate(CUDA_CASES if args.cuda else CASES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if max(abs(r["error"]) for r in results) <= 0.15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
