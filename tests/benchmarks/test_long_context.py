"""long_context.py's search: the longest length that fits, found from either side of a guess."""
import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..",
                                                "benchmarks")))
import long_context  # noqa: E402


def _trial(limit):
    calls = []

    def trial(tokens, fused):
        calls.append(tokens)
        if tokens > limit:
            raise long_context.OutOfMemory(f"{tokens} > {limit}")
        return {"tokens": tokens, "fits": True, "peak_bytes": tokens, "seconds": 0.0}
    return trial, calls


@pytest.mark.parametrize("start", [1000, 20000, 64, 5000])
def test_search_finds_the_longest_fitting_multiple(start):
    trial, calls = _trial(limit=4500)
    found = long_context.search(trial, True, start, 256, deadline=float("inf"),
                                say=lambda line: None)
    assert found["longest_fitting"] == 4352 and found["smallest_failing"] == 4608
    assert found["complete"]
    assert len(calls) == len(set(calls)) <= 14  # no length tried twice


def test_search_when_nothing_fits_or_time_is_up():
    trial, _ = _trial(limit=100)
    found = long_context.search(trial, False, 3000, 256, float("inf"), lambda line: None)
    assert found["longest_fitting"] is None and found["smallest_failing"] == 256
    assert not found["complete"]
    trial, calls = _trial(limit=10 ** 9)
    found = long_context.search(trial, False, 3000, 256, 0.0, lambda line: None)
    assert calls == [] and found["longest_fitting"] is None


def test_ballast_is_the_planners_per_layer_terms():
    dims = long_context.FULL
    one = long_context.ballast_bytes(dims, 1, 0)
    assert one == dims.layer_params() * 8  # bf16 params, grads and two AdamW moments
    assert long_context.ballast_bytes(dims, 28, 1000) == 28 * (one + 2 * dims.hidden * 1000)
