"""Property tests: random shapes and options, torch and Triton backends vs the reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.helpers import HAS_TRITON, make_inputs
from tests.helpers import check_against_reference

shapes = st.fixed_dictionaries(dict(
    n=st.integers(1, 20), h=st.integers(1, 40), v=st.integers(1, 150),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 2.0]), softcap=st.sampled_from([None, 1.5, 30.0]),
    seed=st.integers(0, 2**16)))


def _run(backend, dtype, case):
    torch.manual_seed(case["seed"])
    hidden, weight, targets, bias = make_inputs(case["n"], case["h"], case["v"], dtype,
                                                bias=case["bias"], ignore_frac=case["ignore_frac"])
    check_against_reference(backend, dtype, hidden, weight, targets, bias,
                            temperature=case["temperature"], softcap=case["softcap"])


@settings(max_examples=40, deadline=None)
@given(case=shapes)
def test_torch_backend_properties(case):
    _run("torch", torch.float64, case)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@settings(max_examples=12, deadline=None)
@given(case=shapes)
def test_triton_backend_properties(case):
    _run("triton", torch.float32, case)
