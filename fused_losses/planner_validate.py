"""Check the planner's loss/head term against the measured peak memory of the code it models.

    python -m fused_losses.planner_validate            # every backend x path on the CPU
    python -m fused_losses.planner_validate --run-kernels   # the same, Triton kernels executed
    python -m fused_losses.planner_validate --json out.json
    python -m fused_losses.planner_validate --cuda     # every backend x path on a GPU, bf16

A case builds the head's inputs (hidden [M, H] and weight [V, H], both requiring grad, as the
decoder and ``lm_head`` give them; a fraction of the rows scored), then runs one loss forward
and backward as the library runs it on one path: ``"recompute"`` is ``linear_logprobs`` +
autograd (``api="logprobs"``) or ``linear_cross_entropy(grad_in_forward=False)`` (``"ce"``);
``"one-pass"`` is ``linear_logprobs_loss`` over groups of ``group`` rows (``"logprobs"``) or
``linear_cross_entropy``'s default (``"ce"``). ``impl="unfused"`` runs the materialised
references (``fused_losses.reference``), the trainer's ``--impl unfused``. The measured head
memory is the peak of what the step allocates above the inputs, dW and dH included, as
:func:`fused_losses.planner.head_bytes` counts it:

* on the CPU, :class:`fused_losses._memory.LiveTensorPeak`: the exact peak of live tensor
  storages (every ATen op seen by a dispatch mode; no allocator or RSS noise), in this
  process. The Triton backends run under ``TRITON_INTERPRET=1`` with the interpreter's chunk
  budgets (the case's ``chunk_bytes`` when given: a few chunks at these sizes). The CPU's
  stand-ins are not counted, because the GPU code they replace allocates nothing: the fp32
  upcasts of a 16-bit GEMM (``backends/_gemm.matmul``, the torch backend's ``_matmul_fp32``
  and ``_addmm_fp32``; cuBLAS writes fp32 from 16-bit operands directly). By default the
  Triton kernels are not executed (their launches return at once): a kernel writes into tensors
  allocated before it and allocates none itself, so the allocations, and the peak, are those
  of a real run. ``--run-kernels`` executes them in the interpreter (slowly) and collects
  Python's reference cycles after each launch (the interpreter's frames keep a launch's
  arguments alive until the cyclic collector runs, which a GPU launch does not): the same
  bytes (``tests/test_planner.py`` checks it on one case).
* on a GPU (``--cuda``), ``torch.cuda.max_memory_allocated`` above ``memory_allocated``
  before the step (after a warm-up step), real kernels, the GPU's chunk budgets.

Exit status 1 when any case is off by more than 5%.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
from unittest import mock

import torch

from ._memory import LiveTensorPeak
from .backends import BACKENDS
from .planner import Chunking, GPU_CHUNKING, PATHS, head_bytes

BACKEND_NAMES = tuple(b for b in BACKENDS if b != "auto")  # ordered as registered

# CPU shapes: odd vocabularies, [V, H], [N, H] and the chunk buffers all of a size that shows;
# (rows, hidden, vocab, dtype, scored fraction). The budgets make several chunks here. The
# scored rows are whole groups of 64 (the planner's groups are uniform: every token scored).
CPU_SHAPES = ((512, 256, 4001, "float32", 1.0), (384, 128, 5003, "bfloat16", 1.0),
              (640, 96, 3001, "float32", 0.6), (256, 160, 2999, "bfloat16", 0.75))
CPU_BUDGETS = dict(chunk_bytes=256 << 10, torch_chunk_bytes=1 << 20)


def _cpu_cases() -> list[dict]:
    cases = []
    for rows, hidden, vocab, dtype, scored in CPU_SHAPES:
        shape = dict(rows=rows, hidden=hidden, vocab=vocab, dtype=dtype, scored=scored,
                     **CPU_BUDGETS)
        cases += [dict(shape, impl="unfused", api=api) for api in ("logprobs", "ce")]
        for backend in BACKEND_NAMES:
            fused = dict(shape, impl="fused", backend=backend)
            cases += [dict(fused, path=path, api=api) for path in PATHS
                      for api in ("logprobs", "ce")]
            # one pass over groups: sequences of 64 rows; pairs (half the batch each) beyond
            # the one-pass budget, which the library forms by forward + backward instead
            cases.append(dict(fused, path="one-pass", api="logprobs", group=64))
            cases.append(dict(fused, path="one-pass", api="logprobs", group=rows // 2,
                              one_pass_bytes=(rows // 2) * vocab * 4 - 1))
        cases.append(dict(shape, impl="fused", backend="torch", path="one-pass", api="ce",
                          softcap=30.0))
    return cases


CASES = _cpu_cases()
# On a GPU (--cuda; not run in this repository's CI, which has none): every backend x path in
# bf16 at LM-head shapes of 1B-8B models, 60% of rows scored, and the unfused head.
CUDA_SHAPES = ((8192, 2048, 128256), (16384, 4096, 128256), (8192, 2304, 256000))
CUDA_CASES = [
    dict(shape, device="cuda", dtype="bfloat16", scored=0.6, **kind)
    for rows, hidden, vocab in CUDA_SHAPES
    for shape in (dict(rows=rows, hidden=hidden, vocab=vocab),)
    for kind in ([dict(impl="unfused", api="ce")]
                 + [dict(impl="fused", backend=b, path=p, api="ce")
                    for b in BACKEND_NAMES for p in PATHS])
] + [  # the one pass over sequences of 1024 rows (a chunk of 1024 rows, 512 MiB of logits)
    dict(rows=8192, hidden=2048, vocab=128256, device="cuda", dtype="bfloat16", scored=0.625,
         impl="fused", backend=b, path="one-pass", api="logprobs", group=1024)
    for b in BACKEND_NAMES if b != "torch"]


def chunking_of(case: dict) -> Chunking:
    """The chunk budgets the case runs with (the planner's side of :func:`_budgets`)."""
    if case.get("device", "cpu") == "cuda":
        base = GPU_CHUNKING
    else:
        base = Chunking.interpreter()
        if "chunk_bytes" in case:
            base = Chunking.interpreter(product_chunk_bytes=case["chunk_bytes"],
                                        grad_chunk_bytes=case["chunk_bytes"])
    overrides = {}
    if "torch_chunk_bytes" in case:
        overrides.update(torch_chunk_bytes=case["torch_chunk_bytes"],
                         torch_one_pass_bytes=case["torch_chunk_bytes"])
    if "one_pass_bytes" in case:
        overrides.update(one_pass_bytes=case["one_pass_bytes"],
                         torch_one_pass_bytes=case["one_pass_bytes"])
    return dataclasses.replace(base, **overrides)


def scored_rows(case: dict) -> int:
    return int(case["rows"] * case.get("scored", 1.0))


def predict(case: dict) -> int:
    """The planner's bytes for ``case``."""
    fused = case["impl"] == "fused"
    kwargs = dict(backend=case["backend"], path=case["path"], group=case.get("group"),
                  softcap=case.get("softcap") is not None,
                  chunking=chunking_of(case)) if fused else {}
    return head_bytes(case["impl"], rows=case["rows"], scored=scored_rows(case),
                      hidden=case["hidden"], vocab=case["vocab"], dtype=case["dtype"],
                      **kwargs)


def _inputs(case: dict, rows: int | None = None):
    dtype = getattr(torch, case["dtype"])
    m = rows or case["rows"]
    device = case.get("device", "cpu")
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(m, case["hidden"], generator=g) / case["hidden"] ** 0.25).to(dtype)
    weight = (torch.randn(case["vocab"], case["hidden"], generator=g)
              / case["hidden"] ** 0.25).to(dtype)
    targets = torch.randint(0, case["vocab"], (m,), generator=g)
    targets[int(m * case.get("scored", 1.0)):] = -100
    coef = torch.randn(m, generator=g)
    group = case.get("group")
    groups = None if group is None else torch.arange(m) // min(group, m)
    hidden, weight, targets, coef = (t.to(device) for t in (hidden, weight, targets, coef))
    return (hidden.requires_grad_(), weight.requires_grad_(), targets, coef,
            None if groups is None else groups.to(device))


def _loss(case: dict, hidden, weight, targets, coef, groups) -> torch.Tensor:
    import fused_losses
    from fused_losses.reference import (linear_cross_entropy_reference,
                                        linear_logprobs_reference)

    options = {} if case.get("softcap") is None else dict(softcap=case["softcap"])
    if case["impl"] == "unfused":
        if case["api"] == "ce":
            return linear_cross_entropy_reference(hidden, weight, targets, **options)
        return (linear_logprobs_reference(hidden, weight, targets, **options)
                .logprobs.float() * coef).sum()
    options["backend"] = case["backend"]
    one_pass = case["path"] == "one-pass"
    if case["api"] == "ce":
        return fused_losses.linear_cross_entropy(hidden, weight, targets,
                                                 grad_in_forward=one_pass, **options)
    if one_pass:
        def loss_fn(stats, positions):
            return (stats.logprobs * coef.index_select(0, positions)).sum()

        return fused_losses.linear_logprobs_loss(hidden, weight, targets, loss_fn,
                                                 groups=groups, **options)
    return (fused_losses.linear_logprobs(hidden, weight, targets, **options).logprobs
            * coef).sum()


@contextlib.contextmanager
def _budgets(case: dict):
    """The case's chunk budgets, set where the library reads them at call time."""
    from fused_losses.backends import torch_chunked
    from fused_losses.kernels import configs

    patches = []
    if "chunk_bytes" in case:
        patches += [mock.patch.object(configs, "INTERPRETER_CHUNK_BYTES", case["chunk_bytes"]),
                    mock.patch.object(configs, "INTERPRETER_GRAD_CHUNK_BYTES",
                                      case["chunk_bytes"])]
    if "torch_chunk_bytes" in case:
        patches += [mock.patch.object(torch_chunked, "CHUNK_BYTES", case["torch_chunk_bytes"]),
                    mock.patch.object(torch_chunked, "ONE_PASS_BYTES",
                                      case["torch_chunk_bytes"])]
    if "one_pass_bytes" in case:
        from fused_losses.backends import resolve_backend

        module = resolve_backend(case["backend"], torch.device("cpu"))
        patches.append(mock.patch.object(module, "ONE_PASS_BYTES", case["one_pass_bytes"]))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@contextlib.contextmanager
def _gpu_stand_ins(tracker: LiveTensorPeak, run_kernels: bool):
    """The CPU's stand-ins for GPU operations that allocate nothing, not counted; the Triton
    kernels' launches skipped unless ``run_kernels``."""
    from fused_losses.backends import _gemm, _one_pass, cublas_epilogue, torch_chunked

    def uncounted(fn):
        def wrapper(*args, **kwargs):
            with tracker.excluding():
                return fn(*args, **kwargs)
        return wrapper

    with contextlib.ExitStack() as stack:
        for module in (cublas_epilogue, _one_pass):
            stack.enter_context(mock.patch.object(module, "matmul", uncounted(_gemm.matmul)))
        for name in ("_matmul_fp32", "_addmm_fp32"):
            stack.enter_context(mock.patch.object(torch_chunked, name,
                                                  uncounted(getattr(torch_chunked, name))))
        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime import interpreter

            launch = interpreter.GridExecutor.__call__

            def run_then_collect(self, *args, **kwargs):
                launch(self, *args, **kwargs)
                gc.collect()  # the interpreter's reference cycles hold the launch's arguments

            stack.enter_context(mock.patch.object(
                interpreter.GridExecutor, "__call__",
                run_then_collect if run_kernels else lambda self, *args, **kwargs: None))
        yield


def measure_cpu(case: dict, run_kernels: bool = False) -> int:
    """Peak live tensor bytes of the case's step in this process (see the module docstring).

    Triton backends need ``TRITON_INTERPRET=1`` set before triton was imported."""
    if case.get("backend") in ("triton", "cublas") and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend {case['backend']!r} on the CPU needs TRITON_INTERPRET=1 "
                           "before triton is imported")
    tracker = LiveTensorPeak()
    with _budgets(case), _gpu_stand_ins(tracker, run_kernels):
        warm = _inputs(case, rows=min(case["rows"], 8))  # lazy initialisation is not head memory
        _loss(case, *warm).backward()
        del warm
        inputs = _inputs(case)
        gc.collect()
        with tracker:
            _loss(case, *inputs).backward()
    return tracker.peak


def measure_cuda(case: dict) -> int:
    """``max_memory_allocated`` above ``memory_allocated`` before the case's step, after a
    warm-up step at 64 rows (cuBLAS workspaces, Triton compilation)."""
    warm = _inputs(case, rows=64)
    _loss(case, *warm).backward()
    del warm
    inputs = _inputs(case)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _loss(case, *inputs).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(case: dict, run_kernels: bool = False) -> int:
    """The case's measured bytes, in this process (see the module docstring)."""
    if case.get("device", "cpu") == "cuda":
        return measure_cuda(case)
    return measure_cpu(case, run_kernels)


def describe(case: dict) -> str:
    if case["impl"] == "unfused":
        what = f"unfused {case['api']}"
    else:
        what = f"{case['backend']} {case['path']} {case['api']}"
        if case.get("group"):
            what += f" group={case['group']}"
        if "one_pass_bytes" in case:
            what += " (beyond one-pass budget)"
        if case.get("softcap"):
            what += " softcap"
    return what


def validate(cases=CASES, echo=print, run_kernels: bool = False) -> list[dict]:
    results = []
    echo(f"{'case':<44}{'M':>6}{'N':>6}{'H':>5}{'V':>7} {'dtype':<9}"
         f"{'predicted MiB':>14}{'measured MiB':>14}{'error':>8}")
    for case in cases:
        predicted, measured = predict(case), measure(case, run_kernels)
        error = (predicted - measured) / measured
        results.append(dict(case, predicted=predicted, measured=measured, error=error))
        echo(f"{describe(case):<44}{case['rows']:>6}{scored_rows(case):>6}{case['hidden']:>5}"
             f"{case['vocab']:>7} {case['dtype']:<9}{predicted / 2**20:>14.3f}"
             f"{measured / 2**20:>14.3f}{error:>+8.2%}")
    if results:
        echo("")
        for line in summary(results):
            echo(line)
        worst = max(results, key=lambda r: abs(r["error"]))
        echo(f"largest |error|: {abs(worst['error']):.2%} over {len(results)} cases "
             f"({describe(worst)})")
    return results


def _row(case: dict) -> tuple[str, str]:
    """The (backend, path) row of :func:`summary` that a case falls in."""
    if case["impl"] == "unfused":
        return "unfused (materialised reference)", "-"
    path = case["path"]
    if "one_pass_bytes" in case:
        path += ", pairs beyond the one-pass budget"
    elif case.get("group"):
        path += f", groups of {case['group']} rows"
    elif case.get("softcap"):
        path += f", soft-cap {case['softcap']:g}"
    return case["backend"], path


def summary(results: list[dict]) -> list[str]:
    """The results per backend x path, the Markdown table of ``docs/planner.md``: cases,
    error range, the worst case's predicted / measured MiB."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        rows.setdefault(_row(result), []).append(result)
    order = ("unfused (materialised reference)",) + BACKEND_NAMES

    def percent(error: float) -> str:
        return f"{error:+.2%}".replace("-", "\N{MINUS SIGN}")

    lines = ["| backend | path | cases | error range | worst: predicted / measured MiB |",
             "|---|---|---:|---|---|"]
    for (backend, path), group in sorted(rows.items(), key=lambda kv: order.index(kv[0][0])):
        errors = [r["error"] for r in group]
        worst = max(group, key=lambda r: abs(r["error"]))
        lines.append(f"| {backend} | {path} | {len(group)} | {percent(min(errors))} to "
                     f"{percent(max(errors))} | {worst['predicted'] / 2**20:.3f} / "
                     f"{worst['measured'] / 2**20:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--cuda", action="store_true",
                        help="validate on the GPU (CUDA_CASES) instead")
    parser.add_argument("--run-kernels", action="store_true",
                        help="CPU: execute the Triton kernels in the interpreter (slow)")
    args = parser.parse_args(argv)
    if not args.cuda and "triton" not in sys.modules:  # the Triton backends on the CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = validate(CUDA_CASES if args.cuda else CASES, run_kernels=args.run_kernels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if max(abs(r["error"]) for r in results) <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
