"""Benchmark driver: every variant in its own process, ratios to naive side by side.

    python benchmarks/run.py                   # CPU: the issue-2 case; CUDA: the GPU sweep
    python benchmarks/run.py --preset quick    # tiny sizes, < 1 minute (make demo / bench)
    python benchmarks/run.py --preset sweep    # CPU: time/memory vs N and vs V (plots)
    python benchmarks/run.py --preset dpo      # DPO, 2 pairs x 512 tokens vs Liger
    python benchmarks/run.py --preset grpo     # GRPO, 8 completions x 512 tokens vs Liger
    python benchmarks/run.py --preset chunks   # ours_torch chunk_size sweep (investigation)
    python benchmarks/run.py --preset distill --rounds 3   # distillation vs Liger JSD and TRL

Writes ``benchmarks/results/<tag>.{csv,json}`` and ``<tag>_*.png`` (tag = device + preset),
prints a table of medians with ratios to the naive row of the same mode and case, the roofline
column (time / the 6·N·H·V-FLOP floor at the matmul rate measured in the same run) and, where
the preset has them, the targets of issues 2 and 4 with PASS/MISS (reported, never asserted).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import providers  # noqa: E402  (imports torch; cheap next to the runs)

RESULTS = os.path.join(HERE, "results")

# ---------------------------------------------------------------------------------------------
# Presets: cases x variants. A case is (sweep label, mode, N, H, V, dtype[, pairs, seq]).
# ---------------------------------------------------------------------------------------------

CPU_LOGPROBS = ["naive", "naive_plain", "naive_compile", "torch_lce", "ours_torch"]
CPU_CE = ["naive", "naive_compile", "torch_lce", "torch_lce_ar1", "ours_torch_gif",
          "ours_torch_recompute"]
GPU_LOGPROBS = ["naive", "naive_plain", "naive_compile", "torch_lce", "ours_torch",
                "ours_triton", "cce_exact", "cce"]
GPU_CE = ["naive", "naive_compile", "torch_lce", "ours_torch_gif", "ours_torch_recompute",
          "ours_triton", "liger", "cce_exact", "cce"]
DPO = ["naive", "liger_dpo", "ours_torch", "ours_torch_recompute", "ours_triton"]
# no naive by default: it holds ~6 [N, V] fp32 tensors (3+ GB at the issue's size)
DISTILL = ["liger_jsd", "trl_chunked", "ours_torch", "ours_torch_recompute", "ours_triton"]
GRPO = ["naive", "liger_grpo", "ours_torch", "ours_torch_c128", "ours_torch_recompute",
        "ours_triton"]


def _case(sweep, mode, N, H, V, dtype, **kw):
    return dict(sweep=sweep, mode=mode, N=N, H=H, V=V, dtype=dtype, **kw)


def preset_cases(name: str, cuda: bool) -> list[tuple[dict, list[str]]]:
    """[(case, variants)] for a preset."""
    out = []
    if name == "default":
        for mode, variants in (("logprobs", CPU_LOGPROBS), ("ce", CPU_CE)):
            out.append((_case("point", mode, 4096, 1024, 32000, "fp32"), variants))
    elif name == "quick":
        for mode, variants in (("logprobs", CPU_LOGPROBS), ("ce", CPU_CE)):
            # naive and ours only: compiling takes ~1 min and torch_lce's tiny chunks at
            # H=256 take ~20 s a step on 2 cores.
            variants = [v for v in variants if v.startswith(("naive", "ours_torch"))
                        and v not in ("naive_compile", "naive_plain")]
            if cuda:
                variants += ["ours_triton"]
            out.append((_case("point", mode, 1024, 256, 8000, "fp32"), variants))
    elif name == "sweep":
        # Sized for minutes on 2 cores: torch_lce only in the ce mode (its reduction="none"
        # recompute is 2.4x naive here), no compile, no duplicate naive.
        sweep_variants = {"logprobs": ["naive", "ours_torch"],
                          "ce": ["naive", "torch_lce", "ours_torch_gif", "ours_torch_recompute"]}
        if cuda:
            sweep_variants = {"logprobs": GPU_LOGPROBS, "ce": GPU_CE}
        for mode, variants in sweep_variants.items():
            for n in (512, 1024, 2048):
                out.append((_case("N", mode, n, 1024, 32000, "fp32"), variants))
            for v in (8000, 16000, 32000):
                out.append((_case("V", mode, 1024, 1024, v, "fp32"), variants))
    elif name == "dpo":
        out.append((_case("point", "dpo", 2 * 2 * 512, 1024, 32000, "fp32", pairs=2, seq=512),
                    DPO))
    elif name == "grpo":  # issue 13: G = 8 completions x 512 tokens, old and ref log-probs
        out.append((_case("point", "grpo", 8 * 512, 1024, 32000, "fp32", group=8, seq=512),
                    GRPO))
    elif name == "chunks":
        # 262 rows is the default (_CHUNK_BYTES = 32 MiB of fp32 logits at V=32000); 512 rows
        # (64 MiB) is past glibc's largest dynamic mmap threshold (32 MiB), so its chunk
        # buffers are mmapped and returned to the OS on free.
        out.append((_case("chunk", "logprobs", 4096, 1024, 32000, "fp32"),
                    ["naive", "ours_torch"] + [f"ours_torch_c{c}" for c in
                                               (128, 512, 1024, 4096)]))
        out.append((_case("chunk", "ce", 4096, 1024, 32000, "fp32"),
                    ["naive", "ours_torch_gif"] + [f"ours_torch_c{c}" for c in (1024, 4096)]))
    elif name == "distill":
        # issue 14: N = 4096, student H = 1024, teacher H = 1536, V = 32000, fp32
        out.append((_case("point", "distill", 4096, 1024, 32000, "fp32", teacher_H=1536),
                    DISTILL))
    elif name == "gpu_point":
        # The issue-4 targets only (one device call): Llama-3-8B's head and the Cut
        # Cross-Entropy paper's Gemma-2 case, and the DPO point.
        for mode, variants in (("logprobs", GPU_LOGPROBS), ("ce", GPU_CE)):
            out.append((_case("point", mode, 8192, 4096, 128256, "bf16"), variants))
            out.append((_case("gemma2", mode, 8192, 2304, 256000, "bf16"), variants))
        out.append((_case("point", "dpo", 2 * 8 * 1024, 4096, 128256, "bf16", pairs=8,
                          seq=1024), DPO))
    elif name == "gpu":
        for mode, variants in (("logprobs", GPU_LOGPROBS), ("ce", GPU_CE)):
            for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
                out.append((_case("N", mode, n, 4096, 128256, "bf16"), variants))
            for h in (2048, 4096):
                for v in (32000, 128256, 152064, 256000):
                    out.append((_case(f"V_H{h}", mode, 8192, h, v, "bf16"), variants))
            out.append((_case("gemma2", mode, 8192, 2304, 256000, "bf16"), variants))
            for n in (4096, 8192, 16384):
                out.append((_case("N_fp32", mode, n, 4096, 128256, "fp32"), variants))
        out.append((_case("point", "dpo", 2 * 8 * 1024, 4096, 128256, "bf16", pairs=8,
                          seq=1024), DPO))
    else:
        raise ValueError(f"unknown preset {name!r}")
    return out


# Targets (issue 2 and issue 4): (label, (mode, variant), metric, (mode, reference), bound).
# Metric "x_floor" compares with the roofline floor instead of a reference row.
CPU_TARGETS = [
    ("generic: ours_torch peak mem <= 0.25x naive", ("logprobs", "ours_torch"), "peak_mb",
     ("logprobs", "naive"), 0.25),
    ("generic: ours_torch peak mem <= 0.8x F.linear_cross_entropy chunked (mean)",
     ("logprobs", "ours_torch"), "peak_mb", ("ce", "torch_lce"), 0.8),
    ("generic: ours_torch peak mem <= 0.8x F.linear_cross_entropy chunked (none)",
     ("logprobs", "ours_torch"), "peak_mb", ("logprobs", "torch_lce"), 0.8),
    ("generic: ours_torch time <= 1.4x naive", ("logprobs", "ours_torch"), "fwdbwd_ms",
     ("logprobs", "naive"), 1.4),
    ("ce mean: ours_torch_gif (default) time <= 1.05x naive", ("ce", "ours_torch_gif"),
     "fwdbwd_ms", ("ce", "naive"), 1.05),
    ("ce mean: ours_torch_recompute time <= 1.05x naive (info)",
     ("ce", "ours_torch_recompute"), "fwdbwd_ms", ("ce", "naive"), 1.05),
    ("dpo: ours_torch time <= 1.0x Liger DPO", ("dpo", "ours_torch"), "fwdbwd_ms",
     ("dpo", "liger_dpo"), 1.0),
    ("dpo: ours_torch peak mem <= 0.5x Liger DPO", ("dpo", "ours_torch"), "peak_mb",
     ("dpo", "liger_dpo"), 0.5),
]
# A reference given as a tuple of variants is the fastest of them present in the run (issue
# 14: "the faster of Liger's JSD loss and TRL's chunked divergence", for time and memory).
DISTILL_PEERS = ("distill", ("liger_jsd", "trl_chunked"))
CPU_TARGETS += [
    ("distill: ours_torch time <= 1.0x the faster of Liger JSD / TRL chunked",
     ("distill", "ours_torch"), "fwdbwd_ms", DISTILL_PEERS, 1.0),
    ("distill: ours_torch peak mem <= 0.5x the faster of Liger JSD / TRL chunked",
     ("distill", "ours_torch"), "peak_mb", DISTILL_PEERS, 0.5),
]
GPU_TARGETS = [
    ("generic: ours_triton time <= 0.8x CCE (exact)", ("logprobs", "ours_triton"),
     "fwdbwd_ms", ("logprobs", "cce_exact"), 0.8),
    ("generic: ours_triton time <= 0.8x CCE (filtered default)", ("logprobs", "ours_triton"),
     "fwdbwd_ms", ("logprobs", "cce"), 0.8),
    ("generic: ours_triton time <= 0.5x Liger FLCE", ("logprobs", "ours_triton"), "fwdbwd_ms",
     ("ce", "liger"), 0.5),
    ("generic: ours_triton time <= 1.5x 6NHV floor", ("logprobs", "ours_triton"), "x_floor",
     None, 1.5),
    ("generic: ours_triton peak above inputs+grads <= 64 MB", ("logprobs", "ours_triton"),
     "peak_above_grads_mb", None, 64.0),
] + CPU_TARGETS[-2:]
# Issue 13 (after GPU_TARGETS took the DPO pair above).
GRPO_TARGETS = [
    ("grpo: ours_torch time <= 1.0x Liger GRPO (compiled)", ("grpo", "ours_torch"),
     "fwdbwd_ms", ("grpo", "liger_grpo"), 1.0),
    ("grpo: ours_torch peak mem <= 0.5x Liger GRPO (compiled)", ("grpo", "ours_torch"),
     "peak_mb", ("grpo", "liger_grpo"), 0.5),
    ("grpo: ours_torch_c128 time <= 1.0x Liger GRPO (compiled)", ("grpo", "ours_torch_c128"),
     "fwdbwd_ms", ("grpo", "liger_grpo"), 1.0),
    ("grpo: ours_torch_c128 peak mem <= 0.5x Liger GRPO (compiled)",
     ("grpo", "ours_torch_c128"), "peak_mb", ("grpo", "liger_grpo"), 0.5),
]
CPU_TARGETS += GRPO_TARGETS
GPU_TARGETS += GRPO_TARGETS


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _imports(module):
    try:
        __import__(module)
        return "imports"
    except Exception as err:  # report, never fail
        return f"does not import: {type(err).__name__}: {str(err)[:120]}"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import torch

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "../fused_losses",
                            "../kernels"], cwd=HERE, capture_output=True, text=True).stdout
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "liger_import": _imports("liger_kernel.chunked_loss") if _version("liger-kernel")
        else "not installed",
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "fused_losses_git": git + ("+dirty" if dirty else ""),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def spawn(args, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--device", args.device,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--threads", str(args.threads)] + extra
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exit {proc.returncode}: {tail[:300]}"}


def case_args(case: dict) -> list[str]:
    out = ["--mode", case["mode"], "--N", str(case["N"]), "--H", str(case["H"]),
           "--V", str(case["V"]), "--dtype", case["dtype"]]
    if case["mode"] == "dpo":
        out += ["--pairs", str(case["pairs"]), "--seq", str(case["seq"])]
    if case["mode"] == "distill":
        out += ["--teacher-H", str(case["teacher_H"])]
    if case["mode"] == "grpo":
        out += ["--group", str(case["group"]), "--seq", str(case["seq"])]
    return out


def probe(args, dtype: str) -> dict:
    size = 8192 if args.device.startswith("cuda") else 2048
    saved = (args.warmup, args.repeats)
    args.warmup, args.repeats = (3, 10) if args.device.startswith("cuda") else (1, 5)
    result = spawn(args, ["--probe", "matmul", "--N", str(size), "--dtype", dtype], 600)
    args.warmup, args.repeats = saved
    return result


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def merge_rounds(results: list[dict]) -> dict:
    """One row from several processes' results: the median across rounds of each median."""
    ok = [r for r in results if "fwd_ms" in r]
    if not ok:
        return results[-1]
    row = {}
    for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
        row[key] = _median([r[key]["median"] for r in ok])
        row[key[:-3] + "_min"] = min(r[key]["min"] for r in ok)
        row[key[:-3] + "_max"] = max(r[key]["max"] for r in ok)
    row["cpu_s"] = _median([r["cpu_s"]["median"] for r in ok])
    row["fwdbwd_stdev"] = _median([r["fwdbwd_ms"]["stdev"] for r in ok])
    for key in ("peak_fwd_mb", "peak_mb", "warmup_s"):
        row[key] = _median([r[key] for r in ok])
    for key in ("inputs_mb", "grads_mb", "threads", "loss", "fused_losses_git"):
        row[key] = ok[-1].get(key)
    row["peak_above_grads_mb"] = row["peak_mb"] - row["grads_mb"]
    row["fwdbwd_all_ms"] = [r["fwdbwd_ms"]["median"] for r in ok]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description="fused-losses benchmark driver",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--preset", default=None,
                    choices=["default", "quick", "sweep", "dpo", "chunks", "gpu_point", "gpu",
                             "distill", "grpo"],
                    help="default: 'gpu' when CUDA is available, else 'default'")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--variants", default=None, help="comma list: only these variants")
    ap.add_argument("--modes", default=None, help="comma list of modes to keep")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved (load fairness)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per process")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--tag", default=None, help="output name (default: <device>_<preset>)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    preset = "quick" if args.quick else (args.preset or ("gpu" if cuda else "default"))
    plan = preset_cases(preset, args.device.startswith("cuda"))
    if args.modes:
        plan = [(c, v) for c, v in plan if c["mode"] in args.modes.split(",")]
    if args.variants:
        keep = args.variants.split(",")
        plan = [(c, [v for v in vs if v in keep]) for c, vs in plan]
    device_tag = "cpu" if args.device == "cpu" else \
        torch.cuda.get_device_name().replace(" ", "-")
    tag = args.tag or f"{device_tag}_{preset}"
    meta = machine_info(args.device)
    meta.update(preset=preset, rounds=args.rounds, warmup=args.warmup, repeats=args.repeats)
    print(f"# {tag}: {meta['device_name']} / {meta['cpu_model']} x{meta['cpu_count']}, "
          f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
          f"liger {meta['liger_kernel']} ({meta['liger_import']}), load {meta['loadavg_start']}",
          flush=True)

    # The roofline: the device's matmul rate, measured now, per dtype in the plan.
    rates = {}
    for dtype in sorted({c["dtype"] for c, _ in plan}):
        rates[dtype] = probe(args, dtype)
        print(f"# matmul {dtype}: {rates[dtype]}", flush=True)
    meta["matmul"] = rates

    raw: dict[tuple, list] = {}
    skipped: dict[tuple, str] = {}
    start = time.time()
    for rnd in range(args.rounds):
        for case, variants in plan:
            for name in variants:
                key = (case["sweep"], case["mode"], case["N"], case["H"], case["V"],
                       case["dtype"], name)
                if key in skipped:
                    continue
                reason = providers.skip_reason(providers.get(case["mode"], name), args.device)
                if reason:
                    skipped[key] = reason
                    print(f"  skip {case['mode']:8} {name:22} {reason}", flush=True)
                    continue
                t0 = time.time()
                result = spawn(args, case_args(case) + ["--variant", name], args.timeout)
                if "skipped" in result:
                    skipped[key] = result["skipped"]
                    print(f"  skip {case['mode']:8} {name:22} {result['skipped']}", flush=True)
                    continue
                raw.setdefault(key, []).append(result)
                brief = (f"{result['fwdbwd_ms']['median']:10.1f} ms  {result['peak_mb']:8.1f} MB"
                         if "fwdbwd_ms" in result else result.get("error"))
                print(f"  [{rnd + 1}/{args.rounds}] {case['sweep']:6} {case['mode']:8} "
                      f"N={case['N']:<6} H={case['H']:<5} V={case['V']:<6} {case['dtype']} "
                      f"{name:22} {brief}  ({time.time() - t0:.0f} s)", flush=True)
    meta["elapsed_s"] = round(time.time() - start, 1)
    meta["loadavg_end"] = os.getloadavg()

    rows = build_rows(plan, raw, skipped, rates)
    os.makedirs(RESULTS, exist_ok=True)
    write(tag, meta, rows)
    print_table(rows)
    targets = GPU_TARGETS if args.device.startswith("cuda") else CPU_TARGETS
    verdicts = evaluate_targets(rows, targets)
    if verdicts:
        print_targets(verdicts)
        with open(os.path.join(RESULTS, f"{tag}.json")) as f:
            doc = json.load(f)
        doc["targets"] = verdicts
        with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
            json.dump(doc, f, indent=1)
    if not args.no_plot:
        import plot

        for path in plot.plot_results(os.path.join(RESULTS, f"{tag}.json")):
            print(f"# plot: {os.path.relpath(path)}")
    print(f"# wrote {os.path.relpath(os.path.join(RESULTS, tag))}.{{csv,json}}")


def floor_flops(case: dict) -> int:
    """The fewest FLOPs of a fused forward + backward (each logit formed once): 6NHV (the
    logits, dH, dW); distillation forms the teacher's logits too, 2N(H + H_t)V + 4NHV."""
    flops = 6 * case["N"] * case["H"] * case["V"]
    if case.get("mode") == "distill":
        flops += 2 * case["N"] * case["teacher_H"] * case["V"]
    return flops


def build_rows(plan, raw, skipped, rates) -> list[dict]:
    rows = []
    for case, variants in plan:
        base = {k: case[k] for k in ("sweep", "mode", "N", "H", "V", "dtype")}
        if case["mode"] == "dpo":
            base.update(pairs=case["pairs"], seq=case["seq"])
        if case["mode"] == "distill":
            base.update(teacher_H=case["teacher_H"])
        if case["mode"] == "grpo":
            base.update(group=case["group"], seq=case["seq"])
        naive = None
        for name in variants:
            key = (case["sweep"], case["mode"], case["N"], case["H"], case["V"], case["dtype"],
                   name)
            row = dict(base, variant=name, doc=providers.get(case["mode"], name).doc)
            if key in skipped:
                row.update(status="skipped", reason=skipped[key])
            elif "error" in merge_rounds(raw[key]):
                row.update(status="error", reason=merge_rounds(raw[key])["error"])
            else:
                row.update(status="ok", reason="", **merge_rounds(raw[key]))
                # Roofline: the floor's FLOPs at the measured matmul rate.
                flops = floor_flops(case)
                rate = rates.get(case["dtype"], {}).get("tflops")
                row["flops_6nhv"] = flops
                if rate:
                    row["floor_ms"] = flops / (rate * 1e12) * 1e3
                    row["x_floor"] = row["fwdbwd_ms"] / row["floor_ms"]
                if name == "naive":
                    naive = row
            rows.append(row)
        for row in rows[-len(variants):]:
            if row["status"] == "ok" and naive is not None:
                row["time_x_naive"] = row["fwdbwd_ms"] / naive["fwdbwd_ms"]
                row["mem_x_naive"] = row["peak_mb"] / naive["peak_mb"] if naive["peak_mb"] \
                    else None
                # Load-robust companions: best step against best step, and CPU time (both
                # threads) against CPU time; on a shared machine the median alone misleads.
                row["min_x_naive"] = row["fwdbwd_min"] / naive["fwdbwd_min"]
                row["cpu_x_naive"] = row["cpu_s"] / naive["cpu_s"]
    return rows


COLUMNS = ["sweep", "mode", "N", "H", "V", "dtype", "variant", "status", "fwd_ms", "bwd_ms",
           "fwdbwd_ms", "fwdbwd_min", "fwdbwd_max", "fwdbwd_stdev", "cpu_s", "peak_fwd_mb",
           "peak_mb", "peak_above_grads_mb", "inputs_mb", "grads_mb", "time_x_naive",
           "min_x_naive", "cpu_x_naive", "mem_x_naive", "flops_6nhv", "floor_ms", "x_floor",
           "warmup_s", "threads", "loss", "fused_losses_git",
           "reason", "doc"]


def write(tag, meta, rows):
    with open(os.path.join(RESULTS, f"{tag}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()})
    with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(rows):
    head = (f"{'case':28} {'mode':8} {'variant':22} {'fwd ms':>9} {'bwd ms':>9} "
            f"{'fwd+bwd ms':>11} {'(min..max)':>19} {'peak MB':>8} {'x naive t':>9} "
            f"{'x naive m':>9} {'min x':>6} {'cpu x':>6} {'x floor':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        case = f"{r['sweep']} N={r['N']} H={r['H']} V={r['V']} {r['dtype']}"
        if r["status"] != "ok":
            print(f"{case:28} {r['mode']:8} {r['variant']:22} {r['status']}: {r['reason']}")
            continue
        spread = f"({r['fwdbwd_min']:.0f}..{r['fwdbwd_max']:.0f})"
        print(f"{case:28} {r['mode']:8} {r['variant']:22} {r['fwd_ms']:9.1f} "
              f"{r['bwd_ms']:9.1f} {r['fwdbwd_ms']:11.1f} {spread:>19} {r['peak_mb']:8.1f} "
              f"{_fmt(r.get('time_x_naive'), '9.2f'):>9} {_fmt(r.get('mem_x_naive'), '9.2f'):>9}"
              f" {_fmt(r.get('min_x_naive'), '6.2f'):>6} {_fmt(r.get('cpu_x_naive'), '6.2f'):>6}"
              f" {_fmt(r.get('x_floor'), '7.2f'):>7}")


def evaluate_targets(rows, targets) -> list[dict]:
    ok = {(r["sweep"], r["N"], r["H"], r["V"], r["dtype"], r["mode"], r["variant"]): r
          for r in rows if r["status"] == "ok"}
    cases = sorted({k[:5] for k in ok})
    verdicts = []
    for case in cases:
        for label, (mode, variant), metric, ref, bound in targets:
            row = ok.get(case + (mode, variant))
            if row is None:
                continue
            if ref is None:
                value, ratio = row.get(metric), row.get(metric)
                ref_value = other = None
            else:
                other = ok.get(case + ref) if isinstance(ref[1], str) else min(
                    (ok[case + (ref[0], name)] for name in ref[1] if case + (ref[0], name) in ok),
                    key=lambda r: r["fwdbwd_ms"], default=None)
                if other is None:
                    continue
                value, ref_value = row[metric], other[metric]
                ratio = value / ref_value if ref_value else None
            if ratio is None:
                continue
            verdict = dict(case=" ".join(map(str, case)), target=label, value=value,
                           reference=ref_value, ratio=ratio, bound=bound,
                           reference_variant=None if other is None else other["variant"],
                           verdict="PASS" if ratio <= bound else "MISS")
            if metric == "fwdbwd_ms":  # the load-robust companions, shown beside the verdict
                verdict["ratio_min"] = row["fwdbwd_min"] / other["fwdbwd_min"]
                verdict["ratio_cpu"] = row["cpu_s"] / other["cpu_s"]
            verdicts.append(verdict)
    return verdicts


def print_targets(verdicts):
    print(f"\n{'case':28} {'target':72} {'ours':>9} {'ref':>9} {'ratio':>6} bound verdict"
          "   (time: best-step ratio, CPU-time ratio)")
    for v in verdicts:
        extra = (f"   ({v['ratio_min']:.2f}, {v['ratio_cpu']:.2f})" if "ratio_min" in v else "")
        print(f"{v['case']:28} {v['target']:72} {_fmt(v['value'], '9.1f')} "
              f"{_fmt(v['reference'], '9.1f')} {v['ratio']:6.2f} {v['bound']:<5} "
              f"{v['verdict']}{extra}")


if __name__ == "__main__":
    main()
