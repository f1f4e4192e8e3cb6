"""Autocast and mixed dtypes on the objectives (issue 12 item 3), as ``F.linear`` behaves: under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with an fp32 hidden and head the head runs in
bf16 and every parameter gets its gradient in its own dtype (fp32 master weights keep fp32
gradients); a bf16 hidden with an fp32 head runs in fp32 (torch's promotion). On the torch
backend and the Triton kernels (interpreted, tiny sizes), both gradient paths.

Two references: the objective on the materialised logits of ``F.linear`` under the same
autocast (bf16 tolerances of ``tests/helpers.py``), and, for the objectives called on hidden
states, the float64 objective on the inputs rounded to the dtype the head computes in (the
loss at fp32 scale: this is what tells a head run in bf16 from one run in fp32)."""
import pytest
import torch
import torch.nn.functional as F

from fused_losses import dpo_loss, ift_loss, sft_loss
from tests.helpers import (BACKEND_PARAMS, GRAD_TOL, assert_close, assert_grad_close,
                           assert_values_close, grad_tol, normwise_error)
from tests.objectives.models import lm_batch, tiny_model
from tests.objectives.naive import batch, pairs
from tests.objectives.test_ift import _grads, _params, naive_ift

BACKENDS = [p for p in BACKEND_PARAMS if p.values[0] in ("torch", "triton")]
BF16 = torch.bfloat16


def _logps(logits, labels):
    """[B, T] float64 log-probs of labels[:, t] from logits[:, t-1], labels layout (0 where
    ignored and in column 0)."""
    logp = logits.double().log_softmax(-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return F.pad(torch.where(targets != -100, picked, torch.zeros_like(picked)), (1, 0))


def _sft(logps, labels, ref):  # token-mean NLL
    return -logps.sum() / (labels != -100).sum()


def _dpo(logps, labels, ref, beta=0.1):  # sigmoid DPO on summed log-ratios
    ratios = (logps - ref).sum(-1)
    pairs_ = ratios.shape[0] // 2
    return -F.logsigmoid(beta * (ratios[:pairs_] - ratios[pairs_:])).mean()


OBJECTIVES = {"sft": (sft_loss, _sft, batch), "dpo": (dpo_loss, _dpo, pairs)}


def _context(case):
    return torch.autocast("cpu", dtype=BF16) if case == "autocast" \
        else torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("case", ["autocast", "bf16_hidden_fp32_head"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_sft_and_dpo(objective, case, grad_in_forward, backend):
    loss_fn, naive, make = OBJECTIVES[objective]
    hidden, weight, labels, bias = make(bias=True)
    hidden = hidden.detach() * 3  # logits of a few units: bf16 inputs move the loss > fp32 tol
    logps = _logps(F.linear(hidden, weight, bias), labels).detach()
    ref = (logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64)) * (labels != -100)
    options = dict(ref_logprobs=ref) if objective == "dpo" else {}
    hidden_dtype, compute = (torch.float32, BF16) if case == "autocast" \
        else (BF16, torch.float32)
    leaves = [hidden.detach().to(hidden_dtype).requires_grad_()] + [
        t.detach().float().requires_grad_() for t in (weight, bias)]
    with _context(case):
        out = loss_fn(leaves[0], leaves[1], labels, bias=leaves[2], backend=backend,
                      grad_in_forward=grad_in_forward, **options)
        # F.linear refuses mixed dtypes; mixed precision upcasts the hidden states
        logits = F.linear(leaves[0].to(leaves[1].dtype), *leaves[1:])
    assert logits.dtype == compute
    got = torch.autograd.grad(out.loss, leaves)
    assert out.loss.dtype == torch.float32
    assert [g.dtype for g in got] == [t.dtype for t in leaves]  # each in its own dtype

    linear = naive(_logps(logits, labels), labels, ref)
    assert_close(out.loss, linear, BF16, name="loss vs F.linear")
    for name, g, want in zip(("hidden", "weight", "bias"), got,
                             torch.autograd.grad(linear, leaves)):
        assert_grad_close(g, want, BF16, backend=backend, name=f"grad {name} vs F.linear")

    rounded = [t.detach().to(compute).double().requires_grad_() for t in leaves]
    exact = naive(_logps(F.linear(*rounded), labels), labels, ref)
    assert_values_close(out.loss, exact, compute, name="loss vs rounded inputs")
    for name, g, want, leaf in zip(("hidden", "weight", "bias"), got,
                                   torch.autograd.grad(exact, rounded), leaves):
        coarser = max(compute, leaf.dtype, key=lambda d: GRAD_TOL[d])  # a bf16 hidden's dH
        assert_grad_close(g, want, coarser, backend=backend, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ift(backend):
    """The whole model under autocast, both gradient paths, against the naive two passes
    under the same autocast (its head is the model's own ``F.linear``: bf16 logits). The
    backbone's gradient is rounded in two bf16 backward passes (ours and the reference's):
    twice the tolerance. The two paths give one loss at fp32 scale (the recompute path once
    ran the loss's own math, the propagated weights' block sums, in bf16)."""
    model = tiny_model("llama").float()
    input_ids, labels, attention_mask = lm_batch()
    params = _params(model)
    with torch.autocast("cpu", dtype=BF16):
        want = naive_ift(model, input_ids, labels, attention_mask, 0.2, 0.95)
    want_grads = _grads(want, params)
    losses = []
    for grad_in_forward in (True, False):
        with torch.autocast("cpu", dtype=BF16):
            out = ift_loss(model, input_ids, labels, attention_mask=attention_mask,
                           backend=backend, grad_in_forward=grad_in_forward)
        got = _grads(out.loss, params)
        assert out.loss.dtype == torch.float32
        assert [g.dtype for g in got] == [torch.float32] * len(params)
        assert_close(out.loss, want, BF16, name="loss")
        assert_grad_close(got[0], want_grads[0], BF16, backend=backend, name="lm_head")
        assert normwise_error(got[2], want_grads[2]) <= 2 * grad_tol(BF16, backend), "q_proj"
        losses.append(out.loss.detach())
    assert_values_close(*losses, BF16, name="loss, one pass vs recompute")
