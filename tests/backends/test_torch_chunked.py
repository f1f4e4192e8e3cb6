"""The chunked PyTorch backend: chunking never changes results; float64 gradcheck."""
import torch

from fused_losses import linear_logprobs
from fused_losses.backends.torch_chunked import _chunks
from tests.helpers import make_inputs
from tests.helpers import check_against_reference


def test_chunking_does_not_change_results():
    hidden, weight, targets, bias = make_inputs(23, 16, 50, torch.float64, bias=True)
    for chunk_size in (1, 4, 100):
        check_against_reference("torch", torch.float64, hidden, weight, targets, bias,
                                chunk_size=chunk_size, softcap=4.0)


def test_gradcheck_float64():
    hidden, weight, targets, bias = make_inputs(5, 6, 11, torch.float64, bias=True)
    upstream = torch.randn(4, 5, dtype=torch.float64)

    def fn(h, w, b):
        out = linear_logprobs(h, w, targets, b, backend="torch", temperature=0.8, softcap=3.0,
                              return_lse=True, return_entropy=True, return_logits_mean=True,
                              chunk_size=2)
        stacked = torch.stack([out.logprobs, out.lse, out.entropy, out.logits_mean])
        return (stacked * upstream).sum()

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_chunks_never_split_a_group():
    boundaries = [3, 4, 10, 11, 12, 30]  # group ends; the group 12..30 exceeds the budget
    pieces = list(_chunks(30, 1, chunk_size=5, boundaries=boundaries))
    assert pieces == [slice(0, 4), slice(4, 10), slice(10, 12), slice(12, 30)]
    assert list(_chunks(7, 1, chunk_size=3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
