"""DDP and FSDP2 (torchrun, 2 gloo processes on CPU) on a patched model, patched before and
after wrapping, give one process's losses and weights (see distributed_check.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(Path(__file__).with_name("distributed_check.py"))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for variant in ("ddp patch_first", "ddp wrap_first", "fsdp2 patch_first",
                    "fsdp2 wrap_first"):
        assert f"OK {variant}" in done.stdout
