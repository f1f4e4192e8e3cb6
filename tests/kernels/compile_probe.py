"""Compile every shipped kernel configuration for real GPU targets on a CPU-only machine.

Run as a script (``python tests/kernels/compile_probe.py``) in a process WITHOUT
``TRITON_INTERPRET``, because the interpreter replaces ``@triton.jit`` functions with
objects ``triton.compile`` cannot take. Prints one JSON object per compiled variant:
kernel, dtype, flags, arch, shared memory (bytes) and registers per thread.
"""
from __future__ import annotations

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

from fused_losses.kernels import configs, logprobs_bwd, logprobs_fwd

KERNELS = {
    "fwd": logprobs_fwd._logprobs_fwd_kernel,
    "bwd_dh": logprobs_bwd._logprobs_bwd_dh_kernel,
    "bwd_dw": logprobs_bwd._logprobs_bwd_dw_kernel,
}
DTYPES = {"16bit": ["bf16", "fp16"], "fp32": ["fp32"]}
INPUT_POINTERS = {"hidden_ptr", "weight_ptr", "bias_ptr"}
INT64_POINTERS = {"rows_ptr", "targets_ptr", "argmax_ptr"}
FLOAT_SCALARS = {"inv_temperature", "softcap", "inv_vocab", "filter_eps"}


def signature(fn, dtype: str, meta: dict):
    sig, constexprs = {}, {}
    for name in fn.arg_names:
        if name in meta:
            sig[name], constexprs[name] = "constexpr", meta[name]
        elif name in INPUT_POINTERS:
            sig[name] = f"*{dtype}"
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, constexprs


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
    """Every flag off, and every flag on: the two extremes of each kernel's code paths."""
    flags = [n for n in fn.arg_names if n.isupper() and n.startswith(("HAS_", "WITH_", "FILTER",
                                                                     "NEED_"))]
    return [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]


def main() -> int:
    for (kernel, dtype_class, cfg), arch in itertools.product(configs.SHIPPED, (80, 90)):
        fn = KERNELS[kernel]
        for dtype, flags in itertools.product(DTYPES[dtype_class], flag_sets(fn)):
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            meta.update(flags, DOT_FP32=False, DOT_PRECISION="ieee")
            sig, constexprs = signature(fn, dtype, meta)
            compiled = triton.compile(
                ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
            print(json.dumps(dict(
                kernel=kernel, dtype=dtype, flags="all" if all(flags.values()) else "none",
                arch=arch, config=cfg, shared=compiled.metadata.shared,
                limit=configs.SHARED_MEMORY_LIMIT[arch],
                **resource_usage(compiled.asm["cubin"]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
