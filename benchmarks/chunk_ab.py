"""Chunk-size A/B in ONE process, configurations interleaved step by step.

    python benchmarks/chunk_ab.py --chunks 0,512,1024 --mode logprobs --rounds 3

On a machine shared with other jobs, separate processes see different load; interleaving
the configurations step by step inside one process gives every configuration the same load,
so their ratios are trustworthy even when absolute times are not. 0 = the library default;
an entry that is not a number is a variant name (e.g. ours_torch_recompute).
Time only (memory needs one process per variant: use run.py --preset chunks).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import providers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="logprobs", choices=["logprobs", "ce"])
    ap.add_argument("--chunks", default="0,512,1024")
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    x = providers.make_inputs(args.mode, args.N, args.H, args.V, torch.float32, "cpu")
    default = "ours_torch" if args.mode == "logprobs" else "ours_torch_gif"
    names = ["naive"] + [default if c == "0" else f"ours_torch_c{c}" if c.isdigit() else c
                         for c in args.chunks.split(",")]  # or a variant name
    forwards = {n: providers.get(args.mode, n).build(x) for n in names}
    times = {n: [] for n in names}
    for rnd in range(args.rounds + 1):  # round 0 is the warm-up
        for n in names:
            for p in x.params():
                p.grad = None
            t0 = time.perf_counter()
            forwards[n]().backward()
            if rnd:
                times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["naive"])
    print(f"{args.mode} N={args.N} H={args.H} V={args.V}, {args.rounds} interleaved rounds, "
          f"load {os.getloadavg()[0]:.1f}")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:22} median {med:7.2f} s  x naive {med / base:5.2f}   steps "
              + " ".join(f"{t:.1f}" for t in times[n]))


if __name__ == "__main__":
    main()
