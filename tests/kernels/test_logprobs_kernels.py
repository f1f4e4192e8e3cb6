"""The kernel launchers directly: vocabulary splits, block configs, strides, empty input."""
import pytest
import torch

from fused_losses.backends import torch_chunked
from tests.helpers import HAS_TRITON, assert_close, make_inputs

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

FLAGS = dict(with_argmax=True, with_entropy=True, with_logits_mean=True)


def _rows(targets):
    rows = (targets != -100).nonzero().squeeze(-1)
    return rows, targets[rows]


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 50])
def test_forward_vocab_splits_merge_exactly(num_splits):
    from fused_losses.kernels import logprobs_fwd
    hidden, weight, targets, bias = make_inputs(19, 23, 201, torch.float32, bias=True)
    rows, tgt = _rows(targets)
    with torch.no_grad():
        got = logprobs_fwd.forward(hidden, weight, bias, rows, tgt, softcap=4.0, temperature=0.8,
                              num_splits=num_splits, **FLAGS)
        want = torch_chunked.forward(hidden.double(), weight.double(), bias.double(), rows,
                                      tgt, softcap=4.0, temperature=0.8, **FLAGS)
    for name, a, b in zip(("logprobs", "lse", "argmax", "entropy", "mean"), got, want):
        if name == "argmax":
            assert torch.equal(a, b)
        else:
            assert_close(a, b, torch.float32, name=name)


@pytest.mark.parametrize("config,chunk_bytes", [
    # one vocabulary chunk; chunks of 2 tiles with a ragged last chunk; odd grouping
    (dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16, BLOCK_OUT=16, GROUP_N=1, num_warps=4,
          num_stages=1), 1 << 20),
    (dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16, BLOCK_OUT=32, GROUP_N=2, num_warps=4,
          num_stages=1), 21 * 4 * 32),
    (dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, BLOCK_OUT=16, GROUP_N=3, num_warps=4,
          num_stages=1), 1),
])
def test_backward_block_configs_chunks_and_strided_hidden(config, chunk_bytes):
    from fused_losses.kernels import logprobs_bwd
    hidden, weight, targets, bias = make_inputs(21, 40, 99, torch.float32, bias=True)
    wide = torch.randn(21, 80)
    wide[:, ::2] = hidden.detach()
    strided = wide[:, ::2]  # non-contiguous rows: strides must be honoured
    rows, tgt = _rows(targets)
    lse = torch.logsumexp(strided.double() @ weight.double().T + bias.double(), -1)[rows].float()
    g = torch.randn(rows.numel())
    args = (rows, tgt, lse, None, g, None, None, None)
    got = logprobs_bwd.backward(strided, weight.detach(), bias.detach(), *args, config=config,
                           chunk_bytes=chunk_bytes)
    want = torch_chunked.backward(strided.double(), weight.detach().double(),
                                   bias.detach().double(), rows, tgt, lse.double(), None,
                                   g.double(), None, None, None)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32, scale=4.0)


@pytest.mark.parametrize("group", [4, 7])
def test_grad_gemms_grouped_order_covers_ragged_grids_and_filter_flags(group):
    """The dH and dW GEMMs on their 1-D grouped grids: 5 token tiles, 6 vocabulary tiles and
    7 H tiles, the last of each ragged, in groups of 4 (a partial last group on both grouped
    axes) or 7 (one partial group), at a vocabulary offset, with a gradient row stride wider
    than the chunk; filtered, the keep flags (token tile x vocabulary tile) drop K blocks.
    Every output entry against a float64 product of the kept blocks: a tile visited twice,
    never, or with another tile's flags fails."""
    from fused_losses.kernels import logprobs_bwd
    block = 16
    cfg = dict(BLOCK_N=block, BLOCK_V=block, BLOCK_OUT=block, GROUP_N=group, num_warps=4,
               num_stages=1)
    num_rows, columns, width, v0 = 5 * block - 5, 6 * block - 6, 7 * block - 8, 7
    generator = torch.Generator().manual_seed(group)
    weight = torch.randn(v0 + columns + 3, width, generator=generator)
    hidden = torch.randn(num_rows + 4, width, generator=generator)
    rows = torch.randperm(num_rows + 4, generator=generator)[:num_rows]
    grad = torch.randn(num_rows, columns + 5, generator=generator)[:, :columns]
    keep = (torch.rand(5, 6, generator=generator) > 0.3).to(torch.int8)
    kept = keep.repeat_interleave(block, 0)[:num_rows].repeat_interleave(block, 1)[:, :columns]
    for filtered in (False, True):
        product = grad.double() * kept if filtered else grad.double()
        grad_hidden = torch.randn(num_rows, width, generator=generator)  # accumulated into
        want = grad_hidden.double() + product @ weight[v0:v0 + columns].double()
        logprobs_bwd.grad_hidden_gemm(grad, weight, v0, grad_hidden, keep, cfg,
                                      filtered=filtered)
        assert_close(grad_hidden, want, torch.float32, name="dH")
        # written once (accumulate=False: NaN outside the chunk stays), or added to
        start = torch.full_like(weight, float("nan")) if not filtered else torch.randn_like(weight)
        grad_weight = start.clone()
        logprobs_bwd.grad_weight_gemm(grad, hidden, rows, v0, grad_weight, keep, None, None,
                                      cfg, filtered=filtered, accumulate=filtered)
        want = product.T @ hidden[rows].double()
        if filtered:
            want += start[v0:v0 + columns].double()
        assert_close(grad_weight[v0:v0 + columns], want, torch.float32, name="dW")
        for rest in (slice(0, v0), slice(v0 + columns, None)):  # other rows: untouched
            torch.testing.assert_close(grad_weight[rest], start[rest], rtol=0, atol=0,
                                       equal_nan=True)


@pytest.mark.parametrize("rows,vocab,block_v,budget,expected", [
    (8, 1000, 32, 8 * 4 * 64, 64),        # two tiles fit
    (8, 1000, 32, 1, 32),                 # never less than one tile
    (8, 100, 32, 1 << 30, 128),           # never more than V rounded up to a tile
    (0, 100, 32, 1 << 20, 128),           # no rows: no division by zero
])
def test_chunk_width(rows, vocab, block_v, budget, expected):
    from fused_losses.kernels import configs
    assert configs.chunk_width(rows, vocab, 4, block_v, budget) == expected


def test_empty_rows():
    from fused_losses.kernels import logprobs_fwd
    hidden, weight, _, _ = make_inputs(3, 16, 20, torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    out = logprobs_fwd.forward(hidden.detach(), weight.detach(), None, empty, empty, **FLAGS)
    assert all(t.numel() == 0 for t in out)


def test_float64_is_refused_with_a_pointer_to_the_torch_backend():
    from fused_losses.kernels import logprobs_fwd
    hidden, weight, targets, _ = make_inputs(3, 16, 20, torch.float64)
    rows, tgt = _rows(targets)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        logprobs_fwd.forward(hidden, weight, None, rows, tgt)
