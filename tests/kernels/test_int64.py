"""int64 wherever an index meets a stride: checked in each kernel's Triton IR.

The interpreter computes addresses in numpy and forgives 32-bit overflow tests cannot reach
(it needs a > 8 GB tensor); the IR shows every multiply's width on this CPU-only machine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

PROBE = Path(__file__).with_name("int64_probe.py")


def _probe() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=PROBE.parents[2])
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_no_stride_is_multiplied_in_32_bits():
    from tests.kernels.compile_probe import KERNELS
    records = _probe()
    assert {r["kernel"] for r in records} == {fn.__name__ for fns in KERNELS.values()
                                               for fn in fns}
    narrow = {r["kernel"]: r["narrow"] for r in records if r["narrow"]}
    assert not narrow, json.dumps(narrow, indent=1)


def test_the_check_sees_a_32_bit_stride_product():
    """The pattern matches what Triton emits for ``offs * stride`` with int32 offsets."""
    from tests.kernels.int64_probe import narrow_stride_uses
    emitted = ("%w_73 = tt.splat %stride_wh : i32 -> tensor<64x1xi32> loc(#loc1)\n"
               "%w_84 = arith.muli %w_72, %w_73 : tensor<64x1xi32> loc(#loc2)\n"
               "%h_37 = arith.extsi %stride_hm : i32 to i64 loc(#loc3)\n")
    assert narrow_stride_uses(emitted) == [
        "%w_73 = tt.splat %stride_wh : i32 -> tensor<64x1xi32>"]
