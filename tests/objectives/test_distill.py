"""distill_loss against the naive float64 objective, Liger's LigerFusedLinearJSDLoss and TRL's
chunked divergence (both pure PyTorch on the CPU)."""
import pytest
import torch

from fused_losses import FusedDistillLoss, distill_loss
from tests.divergence import naive
from tests.helpers import HAS_TRITON, assert_close

F64, F32 = torch.float64, torch.float32


def batch(rows=2, T=6, H=24, HT=40, V=97, *, seed=0, dtype=F64):
    """[B, T] labels with a prompt (-100) per row; student H != teacher H_t; biases."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[0, :2] = -100
    labels[1, :3] = -100
    student = [rand(rows, T, H).requires_grad_(), rand(V, H, s=H ** -0.5).requires_grad_(),
               rand(V, s=0.3).requires_grad_()]
    teacher = [rand(rows, T, HT), rand(V, HT, s=2 * HT ** -0.5), rand(V, s=0.3)]
    return student, teacher, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def check(got, want, tensors, dtype, names=("loss", "dH", "dW", "dBias")):
    assert_close(got.detach(), want.detach(), dtype, name=names[0])
    for name, a, b in zip(names[1:], grads(got, tensors), grads(want, tensors)):
        assert_close(a, b, dtype, name=name)


@pytest.mark.parametrize("kind,beta,temperature,hard_weight", [
    ("jsd", 0.5, 1.0, 0.0), ("jsd", 0.2, 2.0, 0.5), ("forward_kl", 0.5, 1.5, 1.0),
    ("reverse_kl", 0.5, 0.8, 0.25), ("jsd", 1.0, 1.0, 0.0)])
def test_matches_naive_objective(kind, beta, temperature, hard_weight):
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), labels = batch()
    options = dict(beta=beta, temperature=temperature, hard_weight=hard_weight)
    out = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                       teacher_bias=t_bias, divergence=kind, backend="torch", **options)
    want = naive.distill(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                         teacher_bias=t_bias, kind=kind, **options)
    check(out.loss, want, (hidden, weight, bias), F64)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    div, logp = naive.per_token(hidden, weight, t_hidden, t_weight, targets, bias=bias,
                                teacher_bias=t_bias, kind=kind, beta=beta,
                                temperature=temperature)
    count = (targets != -100).sum()
    assert_close(out.metrics["divergence"], div.sum().detach() / count, F64, name="divergence")
    if hard_weight:
        assert_close(out.metrics["nll_loss"], -logp.sum().detach() / count, F64, name="nll")
    else:
        assert "nll_loss" not in out.metrics


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_interpreted_backends_float32(backend):
    """The objective on the Triton kernels and on cuBLAS + epilogues (its one pass)."""
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), labels = batch(T=4, dtype=F32)
    out = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                       teacher_bias=t_bias, beta=0.3, temperature=1.7, hard_weight=0.4,
                       backend=backend)
    want = naive.distill(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                         teacher_bias=t_bias, beta=0.3, temperature=1.7, hard_weight=0.4)
    check(out.loss, want, (hidden, weight, bias), F32)


def test_num_items_in_batch_and_the_module():
    """Gradient accumulation divides by the given count; the module twin is the functional."""
    (hidden, weight, bias), (t_hidden, t_weight, _), labels = batch()
    out = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                       divergence="reverse_kl", hard_weight=0.3,
                       num_items_in_batch=torch.tensor(11), backend="torch")
    want = naive.distill(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                         kind="reverse_kl", hard_weight=0.3, divisor=11)
    check(out.loss, want, (hidden, weight, bias), F64)
    module = FusedDistillLoss(divergence="reverse_kl", hard_weight=0.3, backend="torch")
    again = module(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                   num_items_in_batch=11)
    assert_close(again.loss.detach(), want.detach(), F64)
    with pytest.raises(TypeError, match="softcap"):
        FusedDistillLoss(softcap=30.0)


def test_every_label_ignored_gives_zero_and_no_nan():
    (hidden, weight, bias), (t_hidden, t_weight, _), labels = batch()
    labels[:] = -100
    out = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias, hard_weight=1.0,
                       backend="torch")
    dh, dw, db = grads(out.loss, (hidden, weight, bias))
    assert float(out.loss.detach()) == 0.0
    assert not dh.any() and not dw.any() and not db.any()
    assert all(torch.isfinite(m) for m in out.metrics.values())


def test_teacher_shape_and_vocabulary_errors():
    (hidden, weight, _), (t_hidden, t_weight, _), labels = batch()
    with pytest.raises(ValueError, match="teacher_hidden"):
        distill_loss(hidden, weight, t_hidden[:, :-1], t_weight, labels)
    with pytest.raises(ValueError, match="shared vocabulary"):
        distill_loss(hidden, weight, t_hidden, t_weight[:-1], labels)


# Liger's LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta, ignore_index,
# temperature) on aligned [N, H] rows: loss = w_hard·CE + w_soft·JSD, each the sum over
# non-ignored tokens divided by their count; JSD on logits/τ with TRL's mixture and β = 0 / 1
# special cases, CE on the raw logits. So with weight_soft_loss=1 it is distill_loss with
# hard_weight = weight_hard_loss on the shifted rows.
@pytest.mark.parametrize("kind,beta,temperature,hard_weight", [
    ("jsd", 0.5, 1.0, 0.0), ("jsd", 0.3, 2.0, 0.5), ("jsd", 0.0, 1.0, 0.2),
    ("jsd", 1.0, 0.7, 0.0), ("forward_kl", 0.0, 1.0, 0.0), ("reverse_kl", 1.0, 1.3, 0.0)])
def test_matches_liger(kind, beta, temperature, hard_weight):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), labels = batch(T=7, dtype=F32)
    ours = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                        teacher_bias=t_bias, divergence=kind, beta=beta,
                        temperature=temperature, hard_weight=hard_weight, backend="torch")
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=hard_weight, weight_soft_loss=1.0,
                                            beta=beta, temperature=temperature, compiled=False)
    theirs = liger(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight,
                   t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]), t_weight,
                   labels[:, 1:].reshape(-1), bias, t_bias)
    check(ours.loss, theirs, (hidden, weight, bias), F32)


@pytest.mark.slow
def test_matches_trl_chunked_divergence_per_token():
    """TRL's ChunkedDivergenceFunction (GKD's fused head; CPU tiles in torch): per-token
    divergence and its student gradients, for β = 0, 0.5, 1 and τ != 1."""
    trl_kernels = pytest.importorskip("trl.kernels.chunked_divergence")
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), labels = batch(dtype=F32)
    h = hidden.reshape(-1, hidden.shape[-1])
    th = t_hidden.reshape(-1, t_hidden.shape[-1])
    keep = torch.ones(h.shape[0], dtype=torch.long)
    upstream = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3))
    from fused_losses import linear_divergence
    for beta in (0.0, 0.5, 1.0):
        ours = linear_divergence(h, weight, th, t_weight, keep, bias=bias, teacher_bias=t_bias,
                                 divergence="jsd", beta=beta, temperature=1.4,
                                 backend="torch").divergence
        theirs, _entropy = trl_kernels.ChunkedDivergenceFunction.apply(
            h, weight, bias, th, t_weight, t_bias, beta, 1.4)
        check((ours * upstream).sum(), (theirs * upstream).sum(), (hidden, weight, bias), F32)
        assert_close(ours.detach(), theirs.detach(), F32, name=f"beta={beta} per token")
