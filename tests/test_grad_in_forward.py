"""linear_logprobs_loss: gradients formed in forward over chunks of whole groups must equal
autograd through linear_logprobs on the same loss."""
import pytest
import torch
import torch.nn.functional as F

from fused_losses import linear_logprobs, linear_logprobs_loss
from tests.helpers import BACKEND_PARAMS, assert_close, make_inputs



def _pairwise_loss(logprobs_by_seq, seq_of, num_seqs, beta=0.7):
    """A DPO-like loss: non-linear in each pair's summed log-probs (pair k = seqs 2k, 2k+1),
    counting only the pairs that have tokens here (a chunk holds whole pairs)."""
    sums = torch.zeros(num_seqs, dtype=logprobs_by_seq.dtype).index_add(0, seq_of,
                                                                        logprobs_by_seq)
    present = torch.zeros(num_seqs // 2, dtype=torch.bool)
    present[seq_of // 2] = True
    margin = sums[0::2] - sums[1::2]
    return -(F.logsigmoid(beta * margin) * present).sum() / (num_seqs // 2)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_pairwise_loss_matches_autograd(backend, chunk_size):
    seqs, length, width, vocab = 6, 7, 16, 45
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden, weight, targets, bias = make_inputs(seqs, width, vocab, dtype, bias=True,
                                                lead=(seqs, length))
    seq_of_position = torch.arange(seqs).repeat_interleave(length)
    pair_of_position = (seq_of_position // 2).view(seqs, length)

    def chunk_loss(stats, positions):
        return _pairwise_loss(stats.logprobs, seq_of_position[positions], seqs)

    options = dict(backend=backend, temperature=0.9, softcap=5.0)
    if backend == "torch":
        options["chunk_size"] = chunk_size
    loss = linear_logprobs_loss(hidden, weight, targets, chunk_loss, bias,
                                groups=pair_of_position, **options)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))

    out = linear_logprobs(hidden, weight, targets, bias, **options)
    valid = (targets != -100).reshape(-1)
    flat = out.logprobs.reshape(-1)
    want = _pairwise_loss(flat[valid], seq_of_position[valid], seqs)
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    assert_close(loss, want, dtype)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, dtype, scale=4.0)


def test_groups_must_match_targets():
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="groups must be an integer tensor shaped like"):
        linear_logprobs_loss(hidden, weight, targets, lambda s, p: s.logprobs.sum(),
                             groups=torch.zeros(3, dtype=torch.long))


def test_second_backward_is_refused_clearly():
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32)
    loss = linear_logprobs_loss(hidden, weight, targets, lambda s, p: -s.logprobs.sum(),
                                backend="torch")
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_groups_beyond_the_one_pass_bound_take_the_two_pass_path(monkeypatch):
    from fused_losses.backends import torch_chunked
    calls = []
    monkeypatch.setattr(torch_chunked, "forward_backward",
                        lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(torch_chunked, "ONE_PASS_BYTES", 4 * 40 * 3)  # 3 rows of V=40
    hidden, weight, targets, _ = make_inputs(2, 8, 40, torch.float64, lead=(2, 5),
                                             ignore_frac=0.0)
    groups = torch.arange(2).repeat_interleave(5).view(2, 5)  # 5-row groups: too large
    loss = linear_logprobs_loss(hidden, weight, targets, lambda s, p: -s.logprobs.sum(),
                                groups=groups, backend="torch")
    want = -linear_logprobs(hidden, weight, targets, backend="torch").logprobs.sum()
    assert not calls
    assert_close(loss, want, torch.float64)
    for got, expected in zip(torch.autograd.grad(loss, (hidden, weight)),
                             torch.autograd.grad(want, (hidden, weight))):
        assert_close(got, expected, torch.float64)
