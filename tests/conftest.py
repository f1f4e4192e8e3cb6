"""Test set-up. The Triton interpreter must be switched on before triton is first imported,
so this runs before any test module imports the package."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(0)
