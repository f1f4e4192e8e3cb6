"""The backward's dH and dW GEMM kernels on a GPU, by program order (``GROUP_N``).

``python benchmarks/grouped_order.py [--stage check|time|launch]`` (CUDA only; a few seconds
of GPU time plus Triton's compiles; by default ``check`` then ``time``). Prints one JSON
object a line:

- ``check``: both GEMMs with every shipped GEMM config (``bwd`` and ``divergence_bwd``, both
  dtype classes) at ragged sizes (no dimension a multiple of a block; a vocabulary offset; a
  gradient row stride wider than the chunk), exact and filtered (random keep flags), against
  float64 products of the same inputs: normwise relative errors, and whether they pass.
- ``time``: median time (``triton.testing.do_bench``, L2 flushed between runs) and TFLOP/s
  of each GEMM at Llama-3-8B's head (N = 8192, H = 4096, a 4096-column bf16 gradient chunk)
  and at the one pass's chunk (1024 rows over V = 128256; dW added to an fp32 accumulator),
  for several ``GROUP_N``. A group as long as the grouped axis is the plain row-fastest order
  the kernels had before (``benchmarks/notes.md``, G8).

The figures in ``benchmarks/notes.md`` (G8, 2026-11-30) came from a condensed form of the
``time`` stage (the same shapes, config and orders) and of the ``launch`` stage under ncu;
this file's ``check`` stage has run under the interpreter only.

``--stage launch`` only launches each timed GEMM once per order (compiling it), for
``ncu --metrics dram__bytes_read.sum -k regex:_grad_`` to count HBM reads.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fused_losses.kernels import configs, logprobs_bwd

N, H, V = 8192, 4096, 128256
ONE_PASS_ROWS = configs.ONE_PASS_ROWS


def _normwise(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def check(device: torch.device) -> bool:
    """Both GEMMs against float64 at ragged sizes, for every shipped GEMM config."""
    ok = True
    arch = configs.arch_of(device)
    rows_n, columns, width, v0 = 1000, 999, 1001, 37
    for kernel in ("bwd", "divergence_bwd"):
        for dtype in (torch.bfloat16, torch.float32):
            cfg = configs.config_for(kernel, dtype, False, arch)
            gen = torch.Generator(device).manual_seed(0)
            weight = torch.randn(v0 + columns + 5, width, device=device, generator=gen).to(dtype)
            hidden = torch.randn(rows_n + 3, width, device=device, generator=gen).to(dtype)
            rows = torch.randperm(rows_n + 3, device=device, generator=gen)[:rows_n]
            grad = (torch.randn(rows_n, columns + 9, device=device, generator=gen)
                    .to(dtype)[:, :columns])
            tiles = (-(-rows_n // cfg["BLOCK_N"]), -(-columns // cfg["BLOCK_V"]))
            keep = (torch.rand(tiles, device=device, generator=gen) > 0.3).to(torch.int8)
            kept = (keep.repeat_interleave(cfg["BLOCK_N"], 0)[:rows_n]
                    .repeat_interleave(cfg["BLOCK_V"], 1)[:, :columns])
            for filtered in (False, True):
                product = grad.double() * kept if filtered else grad.double()
                grad_hidden = torch.zeros(rows_n, width, device=device)
                logprobs_bwd.grad_hidden_gemm(grad, weight, v0, grad_hidden, keep, cfg,
                                              filtered=filtered)
                grad_weight = torch.zeros(weight.shape, dtype=dtype, device=device)
                logprobs_bwd.grad_weight_gemm(grad, hidden, rows, v0, grad_weight, keep, None,
                                              None, cfg, filtered=filtered, accumulate=False)
                dh = _normwise(grad_hidden, product @ weight[v0:v0 + columns].double())
                dw = _normwise(grad_weight[v0:v0 + columns], product.T @ hidden[rows].double())
                untouched = bool((grad_weight[:v0] == 0).all()
                                 and (grad_weight[v0 + columns:] == 0).all())
                # dH is fp32 (fp32 accumulation); dW is rounded once to the input dtype
                passed = (dh < 1e-5 and untouched
                          and dw < (1e-5 if dtype == torch.float32 else 1.5 * 2.0 ** -8))
                ok &= passed
                print(json.dumps(dict(stage="check", kernel=kernel, dtype=str(dtype),
                                      filtered=filtered, config=cfg, dH_error=dh, dW_error=dw,
                                      untouched=untouched, passed=passed)), flush=True)
    return ok


def _cases(device: torch.device):
    """(name, launch(group), flops, groups to try) for each timed GEMM."""
    bf16 = dict(dtype=torch.bfloat16, device=device)
    cfg = configs.config_for("bwd", torch.bfloat16, False, configs.arch_of(device))
    chunk = configs.chunk_width(N, V, 2, cfg["BLOCK_V"])
    grad = torch.randn(N, chunk, **bf16) * 1e-2
    weight = torch.randn(V, H, **bf16) * 1e-2
    hidden = torch.randn(N, H, **bf16)
    rows = torch.arange(N, device=device)
    keep = torch.ones(1, dtype=torch.int8, device=device)  # never read unfiltered
    grad_hidden = torch.zeros(N, H, dtype=torch.float32, device=device)
    grad_weight = torch.empty(chunk, H, **bf16)
    # the one pass's gradient lies over the first half of fp32 product rows
    products = torch.randn(ONE_PASS_ROWS, V, dtype=torch.float32, device=device) * 1e-2
    pass_grad = products.view(torch.bfloat16)[:, :V]
    pass_hidden = hidden[:ONE_PASS_ROWS]
    pass_rows = rows[:ONE_PASS_ROWS]
    pass_dh = torch.zeros(ONE_PASS_ROWS, H, dtype=torch.float32, device=device)
    accumulator = torch.zeros(V, H, dtype=torch.float32, device=device)

    def with_group(group):
        return dict(cfg, GROUP_N=group)

    token_tiles = -(-N // cfg["BLOCK_N"])
    chunk_tiles = -(-chunk // cfg["BLOCK_V"])
    vocab_tiles = -(-V // cfg["BLOCK_V"])
    pass_tiles = -(-ONE_PASS_ROWS // cfg["BLOCK_N"])
    yield ("dH chunk", lambda g: logprobs_bwd.grad_hidden_gemm(
        grad, weight, 0, grad_hidden, keep, with_group(g), filtered=False),
        2 * N * chunk * H, (1, 4, 8, 16, token_tiles))
    yield ("dW chunk", lambda g: logprobs_bwd.grad_weight_gemm(
        grad, hidden, rows, 0, grad_weight, keep, None, None, with_group(g), filtered=False,
        accumulate=False), 2 * N * chunk * H, (1, 4, 8, 16, chunk_tiles))
    yield ("dH one pass", lambda g: logprobs_bwd.grad_hidden_gemm(
        pass_grad, weight, 0, pass_dh, keep, with_group(g), filtered=False),
        2 * ONE_PASS_ROWS * V * H, (pass_tiles,))
    yield ("dW one pass", lambda g: logprobs_bwd.grad_weight_gemm(
        pass_grad, pass_hidden, pass_rows, 0, accumulator, keep, None, None, with_group(g),
        filtered=False, accumulate=True), 2 * ONE_PASS_ROWS * V * H, (8, vocab_tiles))


def time_orders(device: torch.device, launch_only: bool) -> None:
    from triton.testing import do_bench

    for name, launch, flops, groups in _cases(device):
        for group in groups:
            launch(group)  # compile outside the timing
            torch.cuda.synchronize()
            if launch_only:
                continue
            ms = do_bench(lambda: launch(group), return_mode="median")
            print(json.dumps(dict(stage="time", gemm=name, GROUP_N=group, ms=ms,
                                  tflops=flops / ms / 1e9)), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("check", "time", "launch"),
                        help="one stage only (launch: each timed GEMM once, no timing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("grouped_order.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    ok = check(device) if args.stage in (None, "check") else True
    if args.stage != "check":
        time_orders(device, launch_only=args.stage == "launch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
