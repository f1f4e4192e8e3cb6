"""linear_cross_entropy against F.cross_entropy on materialised float64 logits."""
import pytest
import torch
import torch.nn.functional as F

from fused_losses import linear_cross_entropy
from fused_losses.reference import linear_cross_entropy_reference
from tests.helpers import BACKEND_PARAMS, assert_close, make_inputs


def _double(*tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("reduction, grad_in_forward", [
    ("mean", True), ("mean", False), ("sum", True), ("sum", False), ("none", None)])
def test_matches_reference(backend, reduction, grad_in_forward):
    for options in (dict(), dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0,
                                 temperature=0.9)):
        hidden, weight, targets, bias = make_inputs(11, 19, 77, torch.float32, bias=True)
        loss = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction,
                                    backend=backend, grad_in_forward=grad_in_forward,
                                    **options)
        h64, w64, b64 = _double(hidden, weight, bias)
        ref = linear_cross_entropy_reference(h64, w64, targets, b64, reduction=reduction,
                                             **options)
        assert_close(loss, ref, torch.float32, name="loss")
        upstream = torch.randn(ref.shape, dtype=torch.float64)
        grads = torch.autograd.grad((loss.double() * upstream).sum(), (hidden, weight, bias))
        ref_grads = torch.autograd.grad((ref * upstream).sum(), (h64, w64, b64))
        for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
            assert_close(got, want, torch.float32, scale=4.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_agrees_with_F_cross_entropy_3d(backend):
    hidden, weight, targets, _ = make_inputs(4, 16, 90, torch.float32, lead=(2, 4))
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    h64, w64 = _double(hidden, weight)
    ref = F.cross_entropy((h64 @ w64.T).reshape(-1, 90), targets.reshape(-1))
    assert_close(loss, ref, torch.float32)
    got = torch.autograd.grad(loss, hidden)[0]
    want = torch.autograd.grad(ref, h64)[0]
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_num_items_in_batch_divides_the_sum(backend, reduction):
    hidden, weight, targets, _ = make_inputs(9, 16, 40, torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction,
                                num_items_in_batch=13, backend=backend)
    total = linear_cross_entropy(hidden, weight, targets, reduction="sum", backend=backend)
    torch.testing.assert_close(loss, total / 13)
    grad = torch.autograd.grad(loss, hidden)[0]
    grad_total = torch.autograd.grad(total, hidden)[0]
    torch.testing.assert_close(grad, grad_total / 13)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_all_ignored_is_zero_not_nan(backend, grad_in_forward):
    hidden, weight, targets, bias = make_inputs(5, 16, 40, torch.float32, bias=True)
    targets.fill_(-100)
    loss = linear_cross_entropy(hidden, weight, targets, bias, backend=backend,
                                grad_in_forward=grad_in_forward)
    assert loss.item() == 0.0
    loss.backward()
    for t in (hidden, weight, bias):
        assert (t.grad == 0).all()


def test_bf16_close_to_reference():
    hidden, weight, targets, _ = make_inputs(16, 32, 100, torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, backend="torch")
    h64, w64 = _double(hidden, weight)
    ref = linear_cross_entropy_reference(h64, w64, targets)
    assert_close(loss, ref, torch.bfloat16)
    assert_close(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(ref, w64)[0],
                 torch.bfloat16)


def test_option_errors():
    hidden, weight, targets, _ = make_inputs(3, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        linear_cross_entropy(hidden, weight, targets, reduction="none", num_items_in_batch=3)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        linear_cross_entropy(hidden, weight, targets, num_items_in_batch=0)
    with pytest.raises(ValueError, match="lse_square_scale"):
        linear_cross_entropy(hidden, weight, targets, lse_square_scale=-1.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("no_grad", ["no_grad", "no_input_requires_grad"])
def test_no_gradient_work_when_no_gradient_is_wanted(backend, no_grad, monkeypatch):
    """Under torch.no_grad (or with no input requiring a gradient) the loss is a forward
    pass: neither backward nor the gradients-in-forward pass may run."""
    from fused_losses.backends import resolve_backend
    module = resolve_backend(backend, torch.device("cpu"))
    for name in ("backward", "forward_backward"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _refuse(name))
    hidden, weight, targets, _ = make_inputs(9, 16, 40, torch.float32)
    if no_grad == "no_input_requires_grad":
        hidden, weight = hidden.detach(), weight.detach()
    with torch.no_grad() if no_grad == "no_grad" else torch.enable_grad():
        for grad_in_forward in (None, True):
            loss = linear_cross_entropy(hidden, weight, targets, backend=backend,
                                        grad_in_forward=grad_in_forward)
            want = linear_cross_entropy_reference(*_double(hidden, weight), targets)
            assert_close(loss, want, torch.float32)


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran although no gradient was wanted")
    return refuse


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_takes_hugging_face_labels(backend, reduction):
    """shift=True equals F.cross_entropy on logits[:, :-1] against labels[:, 1:] (HF's causal
    LM loss), values and gradients; the same labels unshifted give a different loss."""
    hidden, weight, labels, _ = make_inputs(0, 16, 53, torch.float32, lead=(3, 7))
    labels[:, 1] = -100  # an ignored label in the middle as well as the random ones
    loss = linear_cross_entropy(hidden, weight, labels, shift=True, reduction=reduction,
                                backend=backend)
    h64, w64 = _double(hidden, weight)
    ref = F.cross_entropy((h64 @ w64.T)[:, :-1].reshape(-1, 53), labels[:, 1:].reshape(-1),
                          reduction=reduction)
    assert loss.shape == (ref.reshape(3, 6) if reduction == "none" else ref).shape
    assert_close(loss.reshape(ref.shape), ref, torch.float32, name="loss")
    loss.sum().backward()
    ref.sum().backward()
    assert_close(hidden.grad, h64.grad, torch.float32, name="dhidden")
    assert_close(weight.grad, w64.grad, torch.float32, scale=4, name="dweight")
    if reduction == "mean":
        unshifted = linear_cross_entropy(hidden, weight, labels, backend=backend)
        assert not torch.allclose(unshifted, loss)


def test_shift_checks_its_argument():
    hidden, weight, labels, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(TypeError, match="shift"):
        linear_cross_entropy(hidden, weight, labels, shift=1)


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(7)])
def test_float64_loss_keeps_float64_precision(num_items_in_batch):
    """The 1/count scale of an integer count must not round the loss to float32."""
    hidden, weight, targets, _ = make_inputs(9, 16, 40, torch.float64)
    loss = linear_cross_entropy(hidden, weight, targets, num_items_in_batch=num_items_in_batch,
                                backend="torch")
    ref = linear_cross_entropy_reference(hidden, weight, targets, reduction="sum")
    ref = ref / ((targets != -100).sum() if num_items_in_batch is None else num_items_in_batch)
    assert loss.dtype == torch.float64
    assert_close(loss, ref, torch.float64, name="loss")
