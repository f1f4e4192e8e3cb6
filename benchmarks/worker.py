"""Measure ONE variant on ONE case in this process; print one ``RESULT {json}`` line.

Run by ``run.py`` (one fresh process per variant, so allocator state, compiled code and
peak-RSS counters never leak between variants). Protocol:

1. build the inputs; record RSS (CUDA: ``memory_allocated``, the baseline);
2. ``warmup`` full steps (forward + backward; includes torch.compile's compilation);
3. ``repeats`` timed steps. Before each: grads set to None, ``gc.collect()``, glibc
   ``malloc_trim(0)`` (freed heap goes back to the OS, so RSS is live memory), then
   * CPU: write ``5`` to ``/proc/self/clear_refs`` (resets the peak RSS ``VmHWM`` to the current
     RSS) and read ``VmRSS`` as the baseline = inputs + code; ``time.perf_counter``;
   * CUDA: ``reset_peak_memory_stats``; the baseline stays ``memory_allocated`` right after
     the inputs were made, so whatever an implementation keeps between steps (a cached
     buffer, ``persistent_mb``) counts as its memory; CUDA events around forward and backward,
     one synchronisation per step;
   time ``forward()`` and ``loss.backward()`` separately and read the peak after each. Peak
   memory = peak - baseline: what one step adds above the inputs, gradients of hidden and
   weight included (they are produced by the step).

``--jobs JSON`` measures several (mode, variant, case) jobs in this one process, in order,
each with its own inputs and baseline (``gpu_session.py`` runs one variant's cases this way:
one start-up, one compilation), one ``RESULT`` line each. ``--wait`` imports everything,
then waits for a line on stdin before touching the device: the session starts the next
variant's process while this one is timed.

``--probe device,copy,matmul``: the device's description, its copy bandwidth and matmul
rate (the ceilings; ``matmul`` alone is the roofline column of ``run.py``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import resource
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _isolate  # noqa: E402,F401  (first: hides what the GPU image lacks, when asked to)
import torch  # noqa: E402

from fused_losses._memory import reset_peak_rss, status_kib  # noqa: E402

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
    """Peak memory above a baseline and step times: CPU (peak RSS, host clock) or CUDA
    (allocator peak above the inputs, CUDA events)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.inputs_base = torch.cuda.memory_allocated() if self.cuda else 0
        self.persistent = 0  # CUDA: bytes allocated at a step's start beyond the inputs

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        _trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = self.inputs_base
            self.persistent = torch.cuda.memory_allocated() - self.inputs_base
        else:
            if not reset_peak_rss():
                raise RuntimeError("cannot write /proc/self/clear_refs: no per-step peak RSS")
            self.base = status_kib("VmRSS") * 1024

    def peak_above(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return status_kib("VmHWM") * 1024 - self.base

    def mark(self):
        """A point in time: a recorded CUDA event, or the host clock."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        """Milliseconds between two marks (CUDA: after the caller synchronised)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _warm_cublas(device: str) -> None:
    """Create cuBLAS's and cuBLASLt's workspaces before the baseline is read: a per-process
    constant that every cuBLAS user pays once, not memory of the loss being measured."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.ones(64, 64, device=device, dtype=dtype)
        torch.mm(a, a)
        torch.addmm(a[0], a, a)
    torch.cuda.synchronize()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    provider = providers.get(args.mode, args.variant)
    cuda = args.device.startswith("cuda")
    if cuda:
        _warm_cublas(args.device)
    leftover = torch.cuda.memory_allocated() if cuda else 0  # kept by earlier jobs
    x = providers.make_inputs(args.mode, args.N, args.H, args.V, dtype, args.device,
                              pairs=args.pairs, seq=args.seq, softcap=args.softcap,
                              teacher_H=args.teacher_H, group=args.group)
    _trim()
    meter = _Meter(args.device)
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

    fwd, bwd, tot, cpu, peak_fwd, peak, persistent = [], [], [], [], [], [], []
    loss_value = None
    for _ in range(args.repeats):
        for p in x.params():
            p.grad = None
        meter.start()
        c0 = _cpu_seconds()
        t0 = meter.mark()
        loss = forward()
        if not cuda:
            meter.sync()
        t1 = meter.mark()
        peak_fwd.append(meter.peak_above())  # the allocator counts on the host: no sync
        loss.backward()
        t2 = meter.mark()
        meter.sync()
        cpu.append(_cpu_seconds() - c0)
        peak.append(meter.peak_above())
        persistent.append(meter.persistent)
        fwd.append(meter.elapsed_ms(t0, t1))
        bwd.append(meter.elapsed_ms(t1, t2))
        tot.append(meter.elapsed_ms(t0, t2))
        loss_value = float(loss.detach())
        del loss

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}

    mb = 1 / 2 ** 20
    result = {
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
        "timer": "cuda events" if cuda else "host clock",
    }
    if cuda:
        result["persistent_mb"] = statistics.median(persistent) * mb
        result["leftover_mb"] = leftover * mb
    if getattr(forward, "note", None):
        result["note"] = forward.note
    return result


def _git_head() -> str:
    """The library commit this process imported (others commit while a long run goes on);
    empty where there is no git or no history (the GPU machine's copy of the tree)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../fused_losses",
                                "../kernels"], cwd=here, capture_output=True, text=True).stdout
    except OSError:
        return ""
    return head + ("+dirty" if head and dirty else "")


def _time_op(op, args) -> list[float]:
    """Seconds per call of ``op`` (``warmup`` untimed calls, then ``repeats`` timed ones)."""
    meter = _Meter(args.device)
    for _ in range(args.warmup):
        op()
    meter.sync()
    times = []
    for _ in range(args.repeats):
        t0 = meter.mark()
        op()
        t1 = meter.mark()
        meter.sync()
        times.append(meter.elapsed_ms(t0, t1) / 1e3)
    return times


def probe_matmul(args) -> dict:
    """Achieved matmul TFLOP/s: median of ``repeats`` square matmuls of ``size`` (random data:
    zeros run faster than real data on some GPUs)."""
    dtype = DTYPES[args.dtype]
    n = args.N
    a = torch.randn(n, n, device=args.device).to(dtype)
    b = torch.randn(n, n, device=args.device).to(dtype)
    out = torch.empty(n, n, device=args.device, dtype=dtype)
    times = _time_op(lambda: torch.mm(a, b, out=out), args)
    med = statistics.median(times)
    return {"size": n, "dtype": args.dtype, "median_s": med,
            "tflops": 2 * n ** 3 / med / 1e12, "best_tflops": 2 * n ** 3 / min(times) / 1e12}


def probe_copy(args) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    nbytes = args.copy_mb * 2 ** 20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    times = _time_op(lambda: dst.copy_(src), args)
    med = statistics.median(times)
    return {"bytes": nbytes, "median_s": med, "gb_per_s": 2 * nbytes / med / 1e9,
            "best_gb_per_s": 2 * nbytes / min(times) / 1e9}


def probe_device(args) -> dict:
    """What the device is: name, compute capability, multiprocessors, L2, memory."""
    if not args.device.startswith("cuda"):
        import platform

        return {"name": "cpu", "processor": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(args.device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory, "cuda_runtime": torch.version.cuda,
            "driver": _driver_version()}


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() \
        else None


# Distributions whose versions a session records (peers, and what their imports pull in).
VERSIONS = ("torch", "triton", "transformers", "accelerate", "datasets", "pyarrow",
            "huggingface-hub", "numpy", "pandas", "dill", "multiprocess", "matplotlib",
            "cut-cross-entropy", "liger-kernel", "trl", "fused-losses")


def probe_imports(args) -> dict:
    """Import every module the variants import (``--modules``; default: every provider's
    ``needs``) in this process, as the variants' processes will: what imported, from where,
    and the versions of ``VERSIONS``."""
    import importlib.metadata

    modules = args.modules.split(",") if args.modules else sorted(
        {m for p in providers.PROVIDERS for m in p.needs})
    imported = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
            imported[name] = {"ok": True, "file": getattr(module, "__file__", None)}
        except Exception as err:  # noqa: BLE001 (recorded: this is what the probe is for)
            message = f"{type(err).__name__}: {err}"
            top = (getattr(err, "name", None) or "").partition(".")[0]
            if top in os.environ.get(_isolate.ENV_HIDE, "").split(",") and \
                    sys.modules.get(top, 0) is None:
                message += (f" ({top} is hidden: the GPU image lacks it and .whl/ does not "
                            "carry it; benchmarks/fetch_peer_wheels.sh)")
            imported[name] = {"ok": False, "error": message[:400]}
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"imports": imported, "versions": versions, "python": sys.version.split()[0]}


PROBES = {"matmul": probe_matmul, "copy": probe_copy, "device": probe_device,
          "imports": probe_imports}


def run_probes(args) -> dict:
    """One probe: its result (run.py's format); several: {name: result}."""
    names = args.probe.split(",")
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"--probe: unknown {unknown}; valid: {sorted(PROBES)}")
    results = {n: PROBES[n](args) for n in names}
    return results[names[0]] if len(names) == 1 else results


JOB_KEYS = ("mode", "variant", "N", "H", "V", "dtype", "softcap", "pairs", "seq", "teacher_H")


def run_jobs(args) -> None:
    """Each job of ``--jobs`` in turn, one ``RESULT`` line each (with its ``job``)."""
    for job in json.loads(args.jobs):
        unknown = set(job) - set(JOB_KEYS)
        if unknown:
            raise ValueError(f"--jobs: unknown keys {sorted(unknown)}; valid: {JOB_KEYS}")
        job_args = argparse.Namespace(**{**vars(args), **job})
        _emit(_guarded(measure, job_args), job=job)
        _trim()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _guarded(fn, args) -> dict:
    try:
        return fn(args)
    except Exception as err:  # reported, not raised: the driver records the failure
        traceback.print_exc()
        msg = str(err).splitlines()[0][:300] if str(err) else ""
        return {"error": f"{type(err).__name__}: {msg}"}


def _emit(result: dict, **extra) -> None:
    print("RESULT " + json.dumps({**result, **extra}), flush=True)


def _preload(args) -> None:
    """Import what the jobs' variants import, so that ``--wait`` returns to a warm process."""
    jobs = json.loads(args.jobs) if args.jobs else [{"mode": args.mode, "variant": args.variant}]
    for job in jobs:
        for module in providers.get(job["mode"], job["variant"]).needs:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 (the job reports it when it builds)
                pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=providers.MODES, default="logprobs")
    ap.add_argument("--variant", default="naive")
    ap.add_argument("--probe", default=None, help="comma list of " + ",".join(PROBES))
    ap.add_argument("--copy-mb", type=int, default=4096, help="copy probe: MiB per buffer")
    ap.add_argument("--modules", default=None, help="imports probe: comma list of modules")
    ap.add_argument("--jobs", default=None, help="JSON list of jobs (keys: mode, variant, "
                    "N, H, V, dtype, softcap, teacher_H, ...): several measurements in this "
                    "process")
    ap.add_argument("--wait", action="store_true",
                    help="import everything, then wait for a line on stdin before starting")
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--teacher-H", type=int, default=1536, help="distill: the teacher's width")
    ap.add_argument("--group", type=int, default=8, help="grpo: completions in the batch")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.wait:
        _preload(args)
        sys.stdin.readline()
    if args.jobs:
        run_jobs(args)
    else:
        _emit(_guarded(run_probes if args.probe else measure, args))


if __name__ == "__main__":
    main()
