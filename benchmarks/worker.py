"""Measure ONE variant on ONE case in this process; print one ``RESULT {json}`` line.

Run by ``run.py`` (one fresh process per variant, so allocator state, compiled code and
peak-RSS counters never leak between variants). Protocol:

1. build the inputs; record RSS;
2. ``warmup`` full steps (forward + backward; includes torch.compile's compilation);
3. ``repeats`` timed steps. Before each: grads set to None, ``gc.collect()``, glibc
   ``malloc_trim(0)`` (freed heap goes back to the OS, so RSS is live memory), then
   * CPU: write ``5`` to ``/proc/self/clear_refs`` (resets the peak RSS ``VmHWM`` to the current
     RSS) and read ``VmRSS`` as the baseline = inputs + code;
   * CUDA: ``reset_peak_memory_stats`` and ``memory_allocated`` as the baseline;
   time ``forward()`` and ``loss.backward()`` separately (CUDA: synchronised), and read the
   peak after each. Peak memory = peak - baseline: what one step adds above the inputs,
   gradients of hidden and weight included (they are produced by the step).

Also: ``--probe matmul`` measures the device's matmul rate for the roofline column.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback

import torch

from fused_losses._memory import reset_peak_rss, status_kib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import providers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: RSS may then include freed-but-cached heap
    _libc = None


def _trim():
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


class _Meter:
    """Peak memory above a baseline, on CPU (peak RSS) or CUDA (allocator peak)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        _trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            if not reset_peak_rss():
                raise RuntimeError("cannot write /proc/self/clear_refs: no per-step peak RSS")
            self.base = status_kib("VmRSS") * 1024

    def peak_above(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return status_kib("VmHWM") * 1024 - self.base


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    provider = providers.get(args.mode, args.variant)
    x = providers.make_inputs(args.mode, args.N, args.H, args.V, dtype, args.device,
                              pairs=args.pairs, seq=args.seq, group=args.group)
    meter = _Meter(args.device)
    _trim()
    rss_after_inputs = status_kib("VmRSS") * 1024
    try:
        forward = provider.build(x)
    except providers._Skip as why:
        return {"skipped": str(why)}
    except ImportError as why:
        return {"skipped": f"import failed: {why}"}

    def step():
        loss = forward()
        loss.backward()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        for p in x.params():
            p.grad = None
        step()
    meter.sync()
    warmup_s = time.perf_counter() - t0

    fwd, bwd, tot, cpu, peak_fwd, peak = [], [], [], [], [], []
    loss_value = None
    for _ in range(args.repeats):
        for p in x.params():
            p.grad = None
        meter.start()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        loss = forward()
        meter.sync()
        t1 = time.perf_counter()
        peak_fwd.append(meter.peak_above())
        loss.backward()
        meter.sync()
        t2 = time.perf_counter()
        cpu.append(_cpu_seconds() - c0)
        peak.append(meter.peak_above())
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        tot.append((t2 - t0) * 1e3)
        loss_value = float(loss.detach())
        del loss

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}

    mb = 1 / 2 ** 20
    return {
        "fwd_ms": summary(fwd), "bwd_ms": summary(bwd), "fwdbwd_ms": summary(tot),
        "cpu_s": summary(cpu),  # process CPU time per step (both threads): load-insensitive
        "peak_fwd_mb": statistics.median(peak_fwd) * mb,
        "peak_mb": statistics.median(peak) * mb,
        "peak_mb_all": [p * mb for p in peak],
        "inputs_mb": x.nbytes() * mb,
        "grads_mb": x.grad_nbytes() * mb,
        "rss_after_inputs_mb": rss_after_inputs * mb,
        "warmup_s": warmup_s,
        "loss": loss_value,
        "threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg()[0],
        "fused_losses_git": _git_head(),
    }


def _git_head() -> str:
    """The library commit this process imported (others commit while a long run goes on)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "../fused_losses",
                            "../kernels"], cwd=here, capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty else "")


def probe_matmul(args) -> dict:
    """Achieved matmul TFLOP/s: median of ``repeats`` square matmuls of ``size``."""
    dtype = DTYPES[args.dtype]
    n = args.N
    a = torch.randn(n, n, device=args.device).to(dtype)
    b = torch.randn(n, n, device=args.device).to(dtype)
    meter = _Meter(args.device)
    for _ in range(args.warmup):
        a @ b
    meter.sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a @ b
        meter.sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"size": n, "dtype": args.dtype, "median_s": med,
            "tflops": 2 * n ** 3 / med / 1e12, "best_tflops": 2 * n ** 3 / min(times) / 1e12}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=providers.MODES, default="logprobs")
    ap.add_argument("--variant", default="naive")
    ap.add_argument("--probe", choices=["matmul"], default=None)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--group", type=int, default=8, help="grpo: completions in the batch")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        result = probe_matmul(args) if args.probe else measure(args)
    except Exception as err:  # reported, not raised: the driver records the failure
        traceback.print_exc()
        msg = str(err).splitlines()[0][:300] if str(err) else ""
        result = {"error": f"{type(err).__name__}: {msg}"}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
