"""Compile kernel configurations for real GPU targets on a CPU-only machine.

Run as a script (``python tests/kernels/compile_probe.py [--scope shipped|space]``) in a
process WITHOUT ``TRITON_INTERPRET``, because the interpreter replaces ``@triton.jit``
functions with objects ``triton.compile`` cannot take. Prints one JSON object per compiled
variant: kernel, dtype, flags, arch, shared memory (bytes), registers per thread, spill stack
and whether Hopper's wgmma was emitted.

Scopes: ``shipped`` (the default) compiles every default of ``configs.SHIPPED`` for its
targets, each dtype of its class and both flag extremes; the epilogue kernels (both
families), which have no K loop, for bf16 and fp32 with every flag on (their heaviest
variant). ``space`` compiles each autotune member that is not a default (``configs.SPACE``)
on the exact path (every flag off: what tuning times) in bf16 or fp32: 112 compiles, minutes
on two cores, so the test runs it as slow.

A launch specialises its arguments: an integer equal to 1 becomes a constant and pointers
and integers divisible by 16 are marked so. That decides whether loads vectorise and the
K loops pipeline (cp.async), so a probe without it reports registers and spills no real
launch has. The probe compiles the specialisation of an LLM head: contiguous rows (inner
strides 1) and every size and row stride a multiple of 16 (H = 4096, V = 128256, ...).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_losses.kernels import (configs, divergence, divergence_epilogue, epilogue, logprobs_bwd,
                                  logprobs_fwd, products)

# config table entry -> the kernels launched with it
KERNELS = {
    "fwd": [logprobs_fwd._logprobs_fwd_kernel],
    "bwd": [logprobs_bwd._grad_logits_kernel, logprobs_bwd._grad_hidden_kernel,
            logprobs_bwd._grad_weight_kernel, products._products_kernel],
    "epilogue": [epilogue._fold_kernel, epilogue._grad_kernel],
    "divergence_epilogue": [divergence_epilogue._pair_fold_kernel,
                            divergence_epilogue._mixture_fold_kernel,
                            divergence_epilogue._pair_grad_kernel],
    "divergence_fwd": [divergence._divergence_stats_kernel, divergence._mixture_stats_kernel],
    "divergence_bwd": [divergence._divergence_grad_kernel, logprobs_bwd._grad_hidden_kernel,
                       logprobs_bwd._grad_weight_kernel],
}
# the kernels with a tl.dot K loop: pipelined (cp.async) and, 16-bit on sm_90, wgmma
GEMMS = {fn.__name__ for entry in ("fwd", "bwd", "divergence_fwd", "divergence_bwd")
         for fn in KERNELS[entry]}
DTYPES = {"16bit": ["bf16", "fp16"], "fp32": ["fp32"]}
# pointers in the input dtype (the gradient chunks and dW are kept in the weight's dtype)
INPUT_POINTERS = {"hidden_ptr", "weight_ptr", "bias_ptr", "grad_chunk_ptr", "grad_weight_ptr",
                  "grad_ptr", "teacher_hidden_ptr", "teacher_weight_ptr", "teacher_bias_ptr"}
INT8_POINTERS = {"keep_ptr"}
INT64_POINTERS = {"rows_ptr", "targets_ptr", "argmax_ptr"}
FLOAT_SCALARS = {"inv_temperature", "softcap", "inv_vocab", "filter_eps", "log_ratio",
                 "one_minus_beta"}
UNIT_STRIDES = {"stride_hh", "stride_wh", "stride_thh", "stride_twh"}
# constexprs a launcher fills from a config entry of another name: the dW GEMM groups
# vocabulary tiles by the config's GROUP_N (logprobs_bwd.grad_weight_gemm)
CONFIG_ALIASES = {"GROUP_V": "GROUP_N"}
# constexprs that select a code path: (value with every flag off, with every flag on); the
# divergence kernels' KIND: forward KL (0, the simplest) and JSD (2, the largest). Their
# gradient kernels are never launched without any upstream gradient (nothing would be
# computed), so the divergence's own stays on at both extremes.
EXTREMES = {"KIND": (0, 2), "WITH_DIVERGENCE_GRAD": (True, True)}


def config_meta(fn, cfg: dict) -> dict:
    """The constexprs of ``fn`` that a launcher fills from the config ``cfg``."""
    meta = {k: v for k, v in cfg.items() if k in fn.arg_names}
    meta.update({alias: cfg[name] for alias, name in CONFIG_ALIASES.items()
                 if alias in fn.arg_names})
    return meta


def signature(fn, dtype: str, meta: dict):
    """(signature, constants, attributes) as a launch on an aligned LLM head specialises them."""
    sig, constexprs = {}, {}
    for name in fn.arg_names:
        if name in meta or name in UNIT_STRIDES:
            sig[name], constexprs[name] = "constexpr", meta.get(name, 1)
        elif name in INPUT_POINTERS:
            sig[name] = f"*{dtype}"
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name in INT8_POINTERS:
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if sig[name].startswith("*") or sig[name] == "i32"}
    return sig, constexprs, aligned


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory stack (bytes; > 0 means register spills)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("stack", "STACK")):
        found = re.search(rf"{field}:(\d+)", out)
        usage[key] = int(found.group(1)) if found else None
    return usage


def flag_sets(fn):
    """Every flag off, and every flag on: the two extremes of each kernel's code paths (one
    set for a kernel without flags)."""
    flags = [n for n in fn.arg_names if n.isupper() and n.startswith(("HAS_", "WITH_", "FILTER",
                                                                     "NEED_", "NARROW_"))]
    if not flags:
        return [{}]
    return [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]


def compile_one(fn, entry: str, dtype: str, flags: dict, cfg: dict, arch: int) -> dict:
    meta = config_meta(fn, cfg)
    every = any(flags.values())  # a flag set is all on or all off (or empty: none)
    meta.update(flags, DOT_FP32=False, TEACHER_DOT_FP32=False, DOT_PRECISION="ieee")
    meta.update({name: ends[every] for name, ends in EXTREMES.items() if name in fn.arg_names})
    sig, constexprs, aligned = signature(fn, dtype, meta)
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs, aligned), target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return dict(
        entry=entry, kernel=fn.__name__, dtype=dtype,
        flags="all" if every else "none", arch=arch, config=cfg,
        shared=compiled.metadata.shared, limit=configs.SHARED_MEMORY_LIMIT[arch],
        # what tuning assumes a config takes (None: no K loop); members over a device's
        # limit by this estimate are never launched there
        estimate=configs.shared_memory(entry, 4 if dtype == "fp32" else 2, cfg)
        if fn.__name__ in GEMMS else None,
        gemm=fn.__name__ in GEMMS,
        # Hopper's warp-group MMA: whether Triton lowered the tile products to wgmma
        wgmma="wgmma.mma_async" in compiled.asm["ptx"],
        # asynchronous global->shared copies: the K loop is software-pipelined
        pipelined="cp.async" in compiled.asm["ptx"],
        # a CTA-wide barrier (the in-place 16-bit gradient orders its loads before stores)
        barrier="bar.sync" in compiled.asm["ptx"],
        **resource_usage(compiled.asm["cubin"]))


def variants(scope: str):
    """(kernel, entry, dtype, flags, config, arch) for every variant the scope compiles."""
    if scope == "shipped":
        for entry, dtype_class, cfg, archs in configs.SHIPPED:
            for fn in KERNELS[entry]:
                if entry in ("epilogue", "divergence_epilogue"):
                    dtypes, flags = ["bf16" if dtype_class == "16bit" else "fp32"], \
                        flag_sets(fn)[-1:]
                else:
                    dtypes, flags = DTYPES[dtype_class], flag_sets(fn)
                for dtype, flag_set, arch in itertools.product(dtypes, flags, archs):
                    yield fn, entry, dtype, flag_set, cfg, arch
    else:
        defaults = [(entry, cls, cfg) for entry, cls, cfg, _ in configs.SHIPPED]
        for entry, table in configs.SPACE.items():
            for dtype_class, members in table.items():
                for cfg in members:
                    if (entry, dtype_class, cfg) in defaults:
                        continue
                    for fn, arch in itertools.product(KERNELS[entry], (80, 90)):
                        yield (fn, entry, "bf16" if dtype_class == "16bit" else "fp32",
                               flag_sets(fn)[0], cfg, arch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scope", choices=("shipped", "space"), default="shipped")
    args = parser.parse_args(argv)
    for fn, entry, dtype, flags, cfg, arch in variants(args.scope):
        print(json.dumps(compile_one(fn, entry, dtype, flags, cfg, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
