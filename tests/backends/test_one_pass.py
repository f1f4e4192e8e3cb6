"""The one-pass (6NHV) path shared by the cuBLAS and the fused Triton backends
(``backends/_one_pass.py``): loss and every input gradient of a grouped, non-linear loss
against autograd through the float64 reference, under the interpreter."""
import pytest
import torch

from fused_losses.backends import resolve_backend
from fused_losses.primitive import LogProbs, _loss_and_grads
from tests.helpers import HAS_TRITON, assert_grad_close, assert_values_close, make_inputs

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

FLAGS = dict(with_argmax=True, with_entropy=True, with_logits_mean=True)


def _scored(targets):
    rows = (targets != -100).nonzero().squeeze(-1)
    return rows, targets[rows]


def _pair_loss(stats, positions):
    """A per-pair non-linearity over summed log-probs, plus lse, entropy and mean terms."""
    pair = torch.div(positions, 6, rounding_mode="floor")
    sums = torch.zeros(int(pair.max()) + 1, dtype=stats.logprobs.dtype).index_add(
        0, pair, stats.logprobs)
    present = torch.zeros_like(sums, dtype=torch.bool)
    present[pair] = True
    return (torch.nn.functional.softplus(-0.5 * sums)[present].sum()
            + 0.1 * stats.lse.square().sum() + 0.2 * stats.entropy.sum()
            - 0.3 * stats.logits_mean.sum())


@pytest.mark.parametrize("backend", ["cublas", "triton"])
@pytest.mark.parametrize("dtype, rows_per_chunk", [
    (torch.float32, 1), (torch.float32, 8), (torch.bfloat16, 1000), (torch.float16, 8)],
    ids=["fp32-1", "fp32-8", "bf16-1000", "fp16-8"])
def test_one_pass_matches_autograd_through_the_reference(backend, dtype, rows_per_chunk):
    """forward_backward's loss and every gradient against autograd on the float64 reference;
    chunks of whole pairs (6 positions), a chunk smaller than a pair grows to hold it."""
    module = resolve_backend(backend, torch.device("cpu"))
    hidden, weight, targets, bias = (None if t is None else t.detach()
                                     for t in make_inputs(24, 29, 83, dtype, bias=True))
    rows, tgt = _scored(targets)
    pair_of = torch.div(rows, 6, rounding_mode="floor")
    boundaries = (torch.nonzero(pair_of[1:] != pair_of[:-1]).squeeze(-1) + 1).tolist() \
        + [rows.numel()]
    options = dict(temperature=1.3, softcap=4.0)
    seen = []

    def head(stats, piece):
        seen.append(rows[piece])
        return _loss_and_grads(_pair_loss, stats, rows[piece])

    loss, *grads = module.forward_backward(
        hidden, weight, bias, rows, tgt, head, boundaries=boundaries, **options, **FLAGS,
        chunk_rows=rows_per_chunk)
    pairs_per_chunk = [set(torch.div(chunk, 6, rounding_mode="floor").tolist())
                       for chunk in seen]
    assert sum(map(len, pairs_per_chunk)) == len(set().union(*pairs_per_chunk))  # no pair split
    expected_chunks = {1: len(boundaries), 1000: 1}.get(rows_per_chunk)
    assert expected_chunks in (None, len(seen))

    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0][rows] @ leaves[1].T + leaves[2]) / options["temperature"]
    logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    lse = logits.logsumexp(-1)
    probs = logits.softmax(-1)
    ref_stats = LogProbs(logits.gather(1, tgt[:, None]).squeeze(1) - lse, lse, None,
                         lse - (probs * logits).sum(-1), logits.mean(-1))
    want = _pair_loss(ref_stats, rows)
    assert_values_close(loss, want.detach(), dtype, name="loss")
    for name, got, ref in zip(("hidden", "weight", "bias"), grads,
                              torch.autograd.grad(want, leaves)):
        assert got.dtype == dtype
        assert_grad_close(got, ref, dtype, name=f"grad {name}")
