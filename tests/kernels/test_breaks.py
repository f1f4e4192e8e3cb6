"""Break a kernel on purpose: the assertions the CUDA tests use must catch each break.

Under the interpreter at reduced size, bf16 (the CUDA tests' hardest tolerance), through
``tests.helpers.check_against_reference``, the one helper ``test_cuda.py`` also uses. A
tolerance loose enough to let one of these through would fail here.
"""
import pytest
import torch

from tests.helpers import check_against_reference, make_inputs

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

BF16 = torch.bfloat16


def _check(weight_layout=None, **kwargs):
    torch.manual_seed(0)
    hidden, weight, targets, bias = make_inputs(16, 24, 100, BF16, bias=True)
    if weight_layout == "transposed":  # a head stored [H, V], passed as P.T
        weight = weight.detach().T.contiguous().requires_grad_().T
    check_against_reference("triton", BF16, hidden, weight, targets, bias, **kwargs)


def test_the_unbroken_kernels_pass():
    _check()
    _check(weight_layout="transposed", with_grads=("logprobs",))


def test_a_vocabulary_split_missing_from_the_lse_merge_is_caught(monkeypatch):
    from fused_losses.kernels import _launch, logprobs_fwd
    monkeypatch.setattr(_launch, "vocab_splits", lambda *args: 3)
    merge = logprobs_fwd._combine

    def without_the_last_split(*partials_then_options):
        *partials, vocab, flags = partials_then_options
        return merge(*(p[:-1] for p in partials), vocab, flags)

    monkeypatch.setattr(logprobs_fwd, "_combine", without_the_last_split)
    with pytest.raises(AssertionError, match="logprobs|lse"):
        _check(with_grads=())


@triton.jit
def _onehot_only(logits, offs_v, mask_n, mask_v, targets, lse, grad_logprobs, grad_lse,
                 grad_entropy, mu, grad_logits_mean, inv_vocab, inv_temperature, softcap,
                 filter_eps, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr,
                 WITH_MEAN_GRAD: tl.constexpr, FILTER: tl.constexpr):
    """_tl_helpers.grad_logits_tile without its softmax term."""
    grad = tl.where(offs_v[None, :] == targets[:, None], grad_logprobs[:, None], 0.0)
    return tl.where(mask_n[:, None] & mask_v[None, :], grad * inv_temperature, 0.0 * logits)


def test_a_dropped_softmax_term_is_caught(monkeypatch):
    from fused_losses.kernels import logprobs_bwd
    monkeypatch.setattr(logprobs_bwd, "grad_logits_tile", _onehot_only)
    with pytest.raises(AssertionError, match="grad hidden"):
        _check(with_grads=("logprobs",))


class _IgnoresWeightStrides:
    """A launchable kernel that reads the weight as if it were contiguous [V, H]."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch, names = self.kernel[grid], self.kernel.arg_names

        def run(*args, **kwargs):
            args = list(args)
            args[names.index("stride_wv")] = args[names.index("H")]
            args[names.index("stride_wh")] = 1
            return launch(*args, **kwargs)
        return run


def test_a_transposed_weight_read_as_contiguous_is_caught(monkeypatch):
    from fused_losses.kernels import logprobs_fwd
    monkeypatch.setattr(logprobs_fwd, "_logprobs_fwd_kernel",
                        _IgnoresWeightStrides(logprobs_fwd._logprobs_fwd_kernel))
    with pytest.raises(AssertionError, match="logprobs|lse"):
        _check(weight_layout="transposed", with_grads=())
