"""Bad input gets a clear error naming the argument, what came and what was expected."""
import pytest
import torch

from fused_losses import linear_logprobs
from tests.helpers import HAS_TRITON

V, H = 10, 8


def ok():
    return torch.randn(4, H), torch.randn(V, H), torch.randint(0, V, (4,))


@pytest.mark.parametrize("mutate, error, pattern", [
    (lambda h, w, t: (h[0], w, t), ValueError, r"targets .*expected shape \(\)"),
    (lambda h, w, t: (h, w[0], t), ValueError, r"weight .*expected shape \[V, H\]"),
    (lambda h, w, t: (h, torch.randn(V, H + 1), t), ValueError, r"weight .*\[V, 8\]"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, r"targets .*expected shape \(4,\)"),
    (lambda h, w, t: (h, w, t.float()), TypeError, r"targets .*float32.*integer"),
    (lambda h, w, t: (h, w.double(), t), TypeError, r"weight .*float64.*dtype of hidden"),
    (lambda h, w, t: (h.long(), w, t), TypeError, r"hidden .*int64.*floating"),
    (lambda h, w, t: (h, w, torch.tensor([0, 1, V, 2])), ValueError,
     r"targets .*outside \[0, 10\).*first: 10"),
    (lambda h, w, t: (h, w, torch.tensor([0, -5, 1, 2])), ValueError, r"first: -5"),
    (lambda h, w, t: (h, w, t.to("meta")), ValueError, r"targets .*expected device cpu"),
    (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
    (lambda h, w, t: (h, torch.randn(0, H), t), ValueError, r"V must be >= 1"),
])
def test_bad_tensors(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_logprobs(*mutate(*ok()))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(temperature=-1.0), "temperature must be a positive number"),
    (dict(temperature=0), "temperature must be a positive number"),
    (dict(softcap=0.0), "softcap must be None or a positive number"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'"),
    (dict(chunk_size=0), "chunk_size must be None or a positive int"),
    (dict(filter_eps=-1.0), "filter_eps must be None or >= 0"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        linear_logprobs(*ok(), **kwargs)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_chunk_size_is_refused_on_the_triton_backend():
    with pytest.raises(ValueError, match="chunk_size=4 .* option of backend='torch'"):
        linear_logprobs(*ok(), backend="triton", chunk_size=4)


def test_bad_bias():
    h, w, t = ok()
    with pytest.raises(ValueError, match=r"bias .*expected shape \[10\]"):
        linear_logprobs(h, w, t, torch.randn(V + 1))
    with pytest.raises(TypeError, match=r"bias .*expected dtype torch.float32"):
        linear_logprobs(h, w, t, torch.randn(V, dtype=torch.float64))


def test_ignore_index_is_not_out_of_range():
    h, w, t = ok()
    t[1] = -100
    linear_logprobs(h, w, t)  # no error
