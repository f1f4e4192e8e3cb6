"""Where the time goes: torch.profiler op breakdown of one forward+backward step per variant.

    python benchmarks/profile_ops.py --mode logprobs --variants naive,ours_torch
    python benchmarks/profile_ops.py --mode logprobs --variants ours_torch_c1024

Each variant runs in its own process (warm-up step, then one profiled step). Prints the top
ops by self CPU time with their share of the step, and writes
``benchmarks/results/profile_<device>_<mode>.txt``. Investigation aid, not a benchmark: the
profiler adds a little overhead to every op.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, HERE)
    import providers

    x = providers.make_inputs(args.mode, args.N, args.H, args.V, torch.float32, "cpu")
    forward = providers.get(args.mode, args.variant).build(x)

    def step():
        for p in x.params():
            p.grad = None
        forward().backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print(f"== {args.mode} {args.variant} N={args.N} H={args.H} V={args.V}: "
          f"step {total / 1e3:.0f} ms self CPU time (threads: {torch.get_num_threads()})")
    print(f"{'op':40} {'calls':>6} {'self ms':>10} {'share':>6}")
    for e in rows:
        print(f"{e.key[:40]:40} {e.count:6d} {e.self_cpu_time_total / 1e3:10.1f} "
              f"{e.self_cpu_time_total / total:6.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="logprobs")
    ap.add_argument("--variants", default="naive,ours_torch")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    report = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--mode", args.mode, "--variant", name,
               "--N", str(args.N), "--H", str(args.H), "--V", str(args.V),
               "--top", str(args.top)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        text = out.stdout if out.returncode == 0 else out.stdout + out.stderr[-2000:]
        print(text, flush=True)
        report.append(text)
    path = args.out or os.path.join(HERE, "results", f"profile_cpu_{args.mode}.txt")
    with open(path, "w") as f:
        f.write("$ python " + " ".join(sys.argv) + "\n\n" + "\n".join(report))
    print(f"# wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
