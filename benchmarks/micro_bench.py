"""pytest-benchmark microbenchmarks: small sizes, quick local comparisons (seconds, not minutes).

    pytest benchmarks/micro_bench.py                          # all, grouped by case
    pytest benchmarks/micro_bench.py -k logprobs --benchmark-compare   # against a saved run
    pytest benchmarks/micro_bench.py --benchmark-autosave     # save for later --benchmark-compare

Not collected by ``pytest tests/`` (testpaths = tests; the file name has no ``test_`` prefix).
All variants share one process here, so memory is not measured: for memory and for
publishable numbers use ``benchmarks/run.py`` (one process per variant). Nothing is asserted
about time.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import providers  # noqa: E402

CASES = {"small": (512, 256, 8000), "odd": (333, 96, 5001)}
VARIANTS = {
    "logprobs": ["naive", "ours_torch"],
    "ce": ["naive", "ours_torch_gif", "ours_torch_recompute"],
}
PARAMS = [(mode, name, case) for mode, names in VARIANTS.items() for name in names
          for case in CASES]


@pytest.mark.parametrize("mode,variant,case", PARAMS,
                         ids=[f"{m}-{c}-{v}" for m, v, c in PARAMS])
def test_fwd_bwd(benchmark, mode, variant, case):
    N, H, V = CASES[case]
    x = providers.make_inputs(mode, N, H, V, torch.float32, "cpu")
    forward = providers.get(mode, variant).build(x)
    benchmark.group = f"{mode} {case} N={N} H={H} V={V}"
    benchmark.extra_info.update(N=N, H=H, V=V, threads=torch.get_num_threads())

    def step():
        for p in x.params():
            p.grad = None
        forward().backward()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
