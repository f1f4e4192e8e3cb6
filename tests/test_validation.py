"""Bad input gets a clear error naming the argument, what came and what was expected."""
import pytest
import torch

from fused_losses import linear_cross_entropy, linear_logprobs
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
    (lambda h, w, t: (h, w.double(), t), TypeError, r"weight .*float64 mixes only with float64"),
    (lambda h, w, t: (h, w.long(), t), TypeError, r"weight .*int64.*expected a floating"),
    (lambda h, w, t: (h.long(), w, t), TypeError, r"hidden .*int64.*floating"),
    (lambda h, w, t: (h, w, torch.tensor([0, 1, V, 2])), ValueError,
     r"targets .*outside \[0, 10\).*first: 10"),
    (lambda h, w, t: (h, w, torch.tensor([0, -5, 1, 2])), ValueError, r"first: -5"),
    (lambda h, w, t: (h, w, t.to("meta")), ValueError, r"targets .*device meta.*none"),
    (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
    (lambda h, w, t: (h, torch.randn(0, H), t), ValueError, r"V must be >= 1"),
    (lambda h, w, t: (h[:, :0], w[:, :0], t), ValueError, r"hidden .*H must be >= 1"),
    (lambda h, w, t: (h.to("meta"), w.to("meta"), t.to("meta")), ValueError,
     r"hidden .*device meta.*meta tensors have none"),
])
def test_bad_tensors(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_logprobs(*mutate(*ok()))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
    (dict(temperature=True), TypeError, r"temperature must be .*True \(bool\)"),
    (dict(softcap=0.0), ValueError, r"softcap \(None for no soft-capping\) must be a positive"),
    (dict(softcap=float("inf")), ValueError, "softcap .* must be a positive finite number"),
    (dict(ignore_index=None), TypeError, r"ignore_index must be an int, got None"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'torch', 'triton'"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None or a positive int"),
    (dict(filter_eps=-1.0), ValueError, "filter_eps must be None or a number >= 0"),
])
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_logprobs(*ok(), **kwargs)


@pytest.mark.parametrize("count, error, pattern", [
    (torch.tensor([3, 4]), ValueError, r"num_items_in_batch must be a positive count .*\(2,\)"),
    (0, ValueError, r"num_items_in_batch must be > 0, got 0"),
    (-5, ValueError, r"num_items_in_batch must be > 0, got -5"),
    (torch.tensor(0), ValueError, r"num_items_in_batch must be > 0, got 0"),
    (torch.tensor([-2.0]), ValueError, r"num_items_in_batch must be > 0, got -2.0"),
    (True, TypeError, r"num_items_in_batch must be a positive count .*\(bool\)"),
    ("8", TypeError, r"num_items_in_batch must be a positive count"),
])
def test_bad_num_items_in_batch(count, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_cross_entropy(*ok(), num_items_in_batch=count)


def test_num_items_in_batch_as_a_one_element_tensor_gives_a_scalar():
    for count in (torch.tensor(4), torch.tensor([4])):
        loss = linear_cross_entropy(*ok(), num_items_in_batch=count)
        assert loss.shape == ()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_chunk_size_is_refused_on_the_triton_backend():
    with pytest.raises(ValueError, match="chunk_size=4 .* option of backend='torch'"):
        linear_logprobs(*ok(), backend="triton", chunk_size=4)


def test_bad_bias():
    h, w, t = ok()
    with pytest.raises(ValueError, match=r"bias .*expected shape \[10\]"):
        linear_logprobs(h, w, t, torch.randn(V + 1))
    with pytest.raises(TypeError, match=r"bias .*float64 mixes only with float64"):
        linear_logprobs(h, w, t, torch.randn(V, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"bias .*int64.*expected a floating dtype"):
        linear_logprobs(h, w, t, torch.zeros(V, dtype=torch.int64))


def test_ignore_index_is_not_out_of_range():
    h, w, t = ok()
    t[1] = -100
    linear_logprobs(h, w, t)  # no error
