"""Every kernel configuration we may launch compiles for sm_80 and sm_90 within shared memory.

The interpreter forgives block shapes, dtype slips and layouts a GPU rejects; compiling to
PTX/cubin for real targets on this CPU-only machine catches those. The shipped defaults run in
the main suite; the autotune space (``configs.SPACE``, 112 compiles) is marked slow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_losses.kernels import configs
from tests.helpers import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

PROBE = Path(__file__).with_name("compile_probe.py")


def _probe(scope: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(PROBE), "--scope", scope], capture_output=True,
                          text=True, env=env, timeout=1800, cwd=PROBE.parents[2])
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled():
    return _probe("shipped")


def test_every_shipped_config_compiles_for_sm80_and_sm90(compiled):
    from tests.kernels.compile_probe import KERNELS, variants  # imports triton: after the mark
    expected = {(fn.__name__, arch) for entry, _, _, archs in configs.SHIPPED
                for fn in KERNELS[entry] for arch in archs}
    assert {(r["kernel"], r["arch"]) for r in compiled} == expected
    assert len(compiled) == len(list(variants("shipped")))
    epilogue = [r for r in compiled if r["entry"] == "epilogue"]
    assert {r["config"]["BLOCK_N"] for r in epilogue} == {t["BLOCK_N"]
                                                          for t in configs.EPILOGUE_TILES}


def test_shared_memory_fits(compiled):
    for record in compiled:
        assert 0 <= record["shared"] <= record["limit"], record


def test_exact_k_loops_are_pipelined_and_16bit_tiles_use_wgmma_on_hopper(compiled):
    """Without FILTER every K loop streams through cp.async stages; 16-bit tile products on
    sm_90 lower to warp-group MMA. A config or code change that loses either is a slowdown
    the interpreter cannot show. (FILTER's data-dependent skip stops the GEMMs' pipelining.)"""
    gemms = [r for r in compiled if r["gemm"]]
    exact = [r for r in gemms if r["flags"] == "none"]
    assert exact and all(r["pipelined"] for r in exact), [r for r in exact if not r["pipelined"]]
    hopper_16bit = [r for r in gemms if r["arch"] == 90 and r["dtype"] != "fp32"]
    assert hopper_16bit and all(r["wgmma"] for r in hopper_16bit)


def test_no_register_spills(compiled):
    """Spills to local memory cost bandwidth in the hot loop; every shipped shape has none."""
    measured = [r for r in compiled if r.get("stack") is not None]
    assert measured, "cuobjdump found no resource usage"
    spilling = [r for r in measured if r["stack"] > 0]
    assert not spilling, spilling


@pytest.mark.slow
def test_every_autotune_member_compiles_and_the_shared_memory_estimate_is_safe():
    """Each member of the tuning space compiles for both targets on the exact path, spill-free
    and pipelined; where ``configs.shared_memory`` lets tuning launch it (estimate within the
    chip's limit) it really fits, so pruning by the estimate never launches a config the chip
    rejects."""
    from tests.kernels.compile_probe import variants
    records = _probe("space")
    assert len(records) == len(list(variants("space")))
    assert all(r["stack"] == 0 for r in records if r["stack"] is not None), \
        [r for r in records if r["stack"]]
    launchable = [r for r in records if r["estimate"] <= r["limit"]]
    assert launchable
    for record in launchable:
        assert record["shared"] <= record["limit"], record
        assert record["pipelined"], record
        assert record["wgmma"] or record["arch"] == 80 or record["dtype"] == "fp32", record
