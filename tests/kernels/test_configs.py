"""Block configurations: the tuning space, its shared-memory pruning and the opt-in tuner
(timing faked: no GPU here)."""
import pytest
import torch

from fused_losses.kernels import configs
from tests.helpers import HAS_TRITON


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_space_leads_with_the_default_and_prunes_by_shared_memory(kernel, dtype):
    members = configs.space(kernel, dtype)
    assert members[0] == configs.config_for(kernel, dtype, interpreting=False)
    assert len({tuple(sorted(m.items())) for m in members}) == len(members)
    itemsize = torch.finfo(dtype).bits // 8
    sizes = sorted(configs.shared_memory(kernel, itemsize, m) for m in members)
    limit = sizes[len(sizes) // 2]
    kept = configs.space(kernel, dtype, limit)
    assert kept and all(configs.shared_memory(kernel, itemsize, m) <= limit for m in kept)
    assert len(kept) < len(members) or sizes[-1] <= limit


def test_token_buckets():
    assert [configs.tokens_bucket(n) for n in (1, 64, 65, 8192, 8193)] == \
        [64, 64, 128, 8192, 16384]


def test_tuning_is_opt_in_and_off_cuda_gives_the_default(monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_VARIABLE, "1")
    calls = []
    cfg = configs.tuned("fwd", torch.bfloat16, (100, 1000, 64), torch.device("cpu"),
                        calls.append)
    assert cfg == configs.config_for("fwd", torch.bfloat16, interpreting=False)
    assert not calls


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tuner_times_each_fitting_member_once_per_key_and_skips_launch_failures(monkeypatch):
    """With the device and the timer faked: the fastest member wins, a member that fails to
    launch is skipped, and a second call with the same key times nothing."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    members = configs.space("bwd", torch.bfloat16)
    fastest, failing = members[3], members[1]
    monkeypatch.setenv(configs.AUTOTUNE_VARIABLE, "1")
    monkeypatch.setattr(configs, "_TUNED", {})
    monkeypatch.setattr(configs, "device_shared_memory", lambda device: 1 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    timed = []

    def fake_bench(fn, return_mode):
        assert return_mode == "median"
        return fn()

    def run(cfg):
        timed.append(cfg)
        if cfg == failing:
            raise OutOfResources(1 << 20, 1 << 18, "shared memory")
        return 1.0 if cfg == fastest else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    device = torch.device("cuda", 0)
    assert configs.tuned("bwd", torch.bfloat16, (8000, 128256, 4096), device, run) == fastest
    assert len(timed) == len(members)
    assert configs.tuned("bwd", torch.bfloat16, (8100, 128256, 4096), device, run) == fastest
    assert len(timed) == len(members)  # same bucket of N: cached
