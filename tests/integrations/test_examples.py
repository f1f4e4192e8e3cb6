"""Every script in examples/ runs to the end on the CPU (each asserts its own outcome)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ["torch_loop.py", "hf_trainer.py", "trl_sft.py", "trl_dpo.py"]


def test_every_example_is_listed():
    assert sorted(SCRIPTS) == sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "tiny.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    done = subprocess.run([sys.executable, script], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
