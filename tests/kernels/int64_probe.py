"""Lower every kernel to Triton IR (no GPU, no interpreter) and list each place where an
index meets a stride in 32-bit arithmetic.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (``tests/kernels/test_int64.py``
does). Strides are left unspecialised (a transposed head has ``stride_wh = V``), so the IR
shows the general path. Prints one JSON object per kernel: its name and the IR lines where
a ``stride_*`` argument is splat or multiplied as i32, which would overflow once the product
passes 2**31 (a transposed [H, V] head with H * V >= 2**31).
"""
from __future__ import annotations

import json
import re
import sys

from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

from fused_losses.kernels import configs
try:
    from tests.kernels.compile_probe import EXTREMES, KERNELS, config_meta, flag_sets, signature
except ModuleNotFoundError:  # run as a script: this folder is on sys.path
    from compile_probe import EXTREMES, KERNELS, config_meta, flag_sets, signature


def triton_ir(fn, cfg: dict, flags: dict) -> str:
    meta = config_meta(fn, cfg)
    meta.update(flags, DOT_FP32=False, TEACHER_DOT_FP32=False, DOT_PRECISION="ieee")
    every = any(flags.values())
    meta.update({name: ends[every] for name, ends in EXTREMES.items() if name in fn.arg_names})
    sig, constexprs, aligned = signature(fn, "bf16", meta)
    for name in fn.arg_names:
        if name.startswith("stride_"):  # the general case, not the unit-stride launch
            sig[name] = "i32"
            constexprs.pop(name, None)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=cfg["num_warps"]))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(fn, sig, constexprs, aligned).make_ir(
        target, options, backend.get_codegen_implementation(options),
        backend.get_module_map(), context)
    return str(module)


# ``%name`` values derived from a stride argument, used in 32-bit splats or multiplies
_I32_USE = re.compile(r"(tt\.splat|arith\.muli)\b[^:]*%stride_\w+[^:]*:\s*(tensor<[^>]*xi32>|i32)")


def narrow_stride_uses(text: str) -> list[str]:
    lines = [re.sub(r"\s+loc\(.*$", "", line).strip() for line in text.splitlines()
             if not line.startswith("#loc")]
    return [line for line in lines if _I32_USE.search(line)]


def main() -> int:
    cfgs = {entry: cfg for entry, _, cfg, _ in configs.SHIPPED}
    for entry, kernels in KERNELS.items():
        for fn in kernels:
            found = []
            for flags in flag_sets(fn):
                found += narrow_stride_uses(triton_ir(fn, cfgs[entry], flags))
            print(json.dumps(dict(kernel=fn.__name__, narrow=sorted(set(found)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
