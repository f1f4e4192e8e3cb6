"""Matmul rate of the torch backend's per-chunk GEMM shapes on this machine.

    python benchmarks/gemm_shapes.py [--H 1024 --V 32000 --rows 128,262,512,1024,4096]

For a chunk of n rows: logits [n,H]@[H,V], dH [n,V]@[V,H], dW += [V,n]@[n,H] (addmm_ into an
fp32 [V,H] accumulator, as backends.torch_chunked._Accumulator does), plus the elementwise passes of a
chunk (logsumexp; sub_/exp_/mul_). Reports GFLOP/s (or GB/s) per shape, the best of 3, so
one can tell whether a chunk size is slow because of its GEMM shape.
"""
from __future__ import annotations

import argparse
import time

import torch


def best(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rows", default="128,262,512,1024,4096")
    args = ap.parse_args()
    H, V = args.H, args.V
    w = torch.randn(V, H) * H ** -0.5
    dw = torch.zeros(V, H)
    print(f"threads {torch.get_num_threads()}, H={H}, V={V}; per-chunk best of 3, and the "
          f"time that shape would take for 4096 rows")
    print(f"{'rows':>5} {'logits GF/s':>11} {'dH GF/s':>8} {'dW addmm GF/s':>13} "
          f"{'lse ms':>7} {'grad ms':>7} {'chunk total ms':>14} {'x 4096 rows ms':>14}")
    for n in map(int, args.rows.split(",")):
        h = torch.randn(n, H)
        g = torch.randn(n, V)
        flops = 2 * n * H * V
        t_fwd = best(lambda: h @ w.T)
        t_dh = best(lambda: g @ w)
        t_dw = best(lambda: dw.addmm_(g.T, h))
        z = h @ w.T
        t_lse = best(lambda: torch.logsumexp(z, -1))
        lse = torch.logsumexp(z, -1)
        t_grad = best(lambda: z.clone().sub_(lse.unsqueeze(1)).exp_().mul_(0.5))
        total = t_fwd * 2 + t_dh + t_dw + t_lse + t_grad
        print(f"{n:5d} {flops / t_fwd / 1e9:11.1f} {flops / t_dh / 1e9:8.1f} "
              f"{flops / t_dw / 1e9:13.1f} {t_lse * 1e3:7.1f} {t_grad * 1e3:7.1f} "
              f"{total * 1e3:14.1f} {total * 1e3 * 4096 / n:14.0f}")


if __name__ == "__main__":
    main()
