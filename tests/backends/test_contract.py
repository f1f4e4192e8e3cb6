"""Every backend honours the contract of ``fused_losses.backends`` on any input: weights and
hidden states of any layout, upstream gradients of any strides, fp16 with tiny per-token
gradients, ``filter_eps`` on the probabilities, and NaN/inf rows. Each ``test_*`` failed on
the code before the contract was written down (commit 38e537e) on at least one backend.

The ``check_*`` functions take a device: ``tests/kernels/test_cuda.py`` runs them on CUDA,
where layouts, strides and NaN handling are the GPU's own, not the interpreter's.
"""
import pytest
import torch
import torch.nn.functional as F

from fused_losses import linear_cross_entropy, linear_logprobs, linear_logprobs_loss
from fused_losses.reference import linear_logprobs_reference, reference_logits
from tests.helpers import (BACKEND_PARAMS, assert_grad_close, assert_values_close,
                           check_against_reference, make_inputs)

F64 = torch.float64
CPU = "cpu"


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _reference_of(hidden, weight, targets, bias, **kwargs):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)
              if t is not None]
    ref = linear_logprobs_reference(leaves[0], leaves[1], targets,
                                    leaves[2] if bias is not None else None, **kwargs)
    return leaves, ref


# --- layouts ---------------------------------------------------------------------------------

def _weight_view(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The [V, H] view passed as weight; its base is a fresh leaf."""
    v, h = weight.shape
    rand = dict(device=weight.device, dtype=weight.dtype)
    if layout == "transposed":  # a head stored [H, V], passed as P.T: strides (1, V)
        return _leaf(weight.T.contiguous()).T
    if layout == "row_sliced":  # rows [3, 3 + V) of a larger table
        return _leaf(torch.cat([torch.randn(3, h, **rand), weight.detach(),
                                torch.randn(2, h, **rand)]))[3:3 + v]
    if layout == "column_sliced":  # columns of a [V, H + 5] table: row stride H + 5
        return _leaf(torch.cat([torch.randn(v, 2, **rand), weight.detach(),
                                torch.randn(v, 3, **rand)], 1))[:, 2:2 + h]
    return _leaf(weight)


def _hidden_view(hidden: torch.Tensor, layout: str) -> torch.Tensor:
    n, h = hidden.shape
    if layout == "transposed":  # [H, N] storage: strides (1, N)
        return _leaf(hidden.T.contiguous()).T
    if layout == "strided":  # every other row and column of a larger buffer
        big = torch.randn(2 * n, 2 * h, device=hidden.device, dtype=hidden.dtype)
        big[::2, ::2] = hidden.detach()
        return _leaf(big)[::2, ::2]
    return _leaf(hidden)


LAYOUTS = [("transposed", "contiguous"), ("row_sliced", "strided"),
           ("column_sliced", "transposed")]


def check_layouts(backend, weight_layout, hidden_layout, device=CPU, shape=(11, 19, 70),
                  dtype=torch.float32):
    hidden, weight, targets, bias = make_inputs(*shape, dtype, bias=True, device=device)
    check_against_reference(backend, dtype, _hidden_view(hidden, hidden_layout),
                            _weight_view(weight, weight_layout), targets, bias, softcap=4.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("weight_layout, hidden_layout", LAYOUTS)
def test_weight_and_hidden_of_any_layout(backend, weight_layout, hidden_layout):
    check_layouts(backend, weight_layout, hidden_layout)


def _cross_entropy_grads(hidden, weight, targets, bias, softcap=None):
    """The float64 reference's mean cross-entropy and its gradients on materialised logits."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)
              if t is not None]
    logits = reference_logits(leaves[0], leaves[1], leaves[2] if bias is not None else None,
                              softcap=softcap)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, torch.autograd.grad(loss, leaves)


def check_one_pass_layouts(backend, weight_layout, hidden_layout, device=CPU,
                           shape=(11, 19, 70), dtype=torch.float32):
    """The gradients-in-forward path (what the losses run by default) on the same views:
    it writes dW and dH itself, so a view's strides are its own concern."""
    hidden, weight, targets, bias = make_inputs(*shape, dtype, bias=True, device=device)
    hidden, weight = _hidden_view(hidden, hidden_layout), _weight_view(weight, weight_layout)
    loss = linear_cross_entropy(hidden, weight, targets, bias, softcap=4.0, backend=backend,
                                grad_in_forward=True)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want_loss, want = _cross_entropy_grads(hidden, weight, targets, bias, softcap=4.0)
    assert_values_close(loss, want_loss, dtype, name="loss")
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.shape == w.shape and g.dtype == dtype
        assert_grad_close(g, w, dtype, name=f"one pass, {weight_layout} weight: grad {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("weight_layout, hidden_layout", LAYOUTS)
def test_one_pass_on_weight_and_hidden_of_any_layout(backend, weight_layout, hidden_layout):
    check_one_pass_layouts(backend, weight_layout, hidden_layout)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_head_tied_with_the_input_embedding(backend, grad_in_forward):
    """One Parameter as embedding table and head: autograd adds both gradients."""
    vocab, width = 60, 16
    ids = torch.randint(0, vocab, (3, 5))
    targets = torch.randint(0, vocab, (3, 5))
    mix = torch.randn(width, width, dtype=F64) / width ** 0.5

    def run(table, head_fn):
        hidden = torch.tanh(F.embedding(ids, table) @ mix.to(table.dtype))
        return torch.autograd.grad(head_fn(hidden, table), table)[0]

    table = torch.randn(vocab, width, dtype=F64)
    got = run(table.float().requires_grad_(), lambda h, w: linear_cross_entropy(
        h, w, targets, backend=backend, grad_in_forward=grad_in_forward))
    want = run(table.clone().requires_grad_(),
               lambda h, w: F.cross_entropy((h @ w.T).reshape(-1, vocab), targets.reshape(-1)))
    assert_grad_close(got, want, torch.float32, name="tied table")


# --- upstream gradients of any strides -------------------------------------------------------

def check_strided_upstream(backend, device=CPU):
    """A loss_fn ending in .sum() hands its backward expanded (stride-0) per-token grads."""
    hidden, weight, targets, bias = make_inputs(13, 16, 45, torch.float32, bias=True,
                                                device=device)
    leaves, ref = _reference_of(hidden, weight, targets, bias, return_entropy=True)
    want = torch.autograd.grad((ref.logprobs + 0.5 * ref.entropy).sum(), leaves)

    def chunk_loss(stats, positions):
        return stats.logprobs.sum() + (0.5 * stats.entropy).sum()

    def summed():
        out = linear_logprobs(hidden, weight, targets, bias, return_entropy=True,
                              backend=backend)
        return out.logprobs.sum() + (0.5 * out.entropy).sum()

    paths = {
        "loss_fn": lambda: linear_logprobs_loss(hidden, weight, targets, chunk_loss, bias,
                                                return_entropy=True, backend=backend),
        "sum": summed,
    }
    for path, loss in paths.items():
        got = torch.autograd.grad(loss(), (hidden, weight, bias))
        for name, g, w in zip(("hidden", "weight", "bias"), got, want):
            assert_grad_close(g, w, torch.float32, name=f"{path}: grad {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_upstream_gradients_of_any_strides(backend):
    check_strided_upstream(backend)


# --- fp16 with tiny per-token gradients ------------------------------------------------------

def check_fp16_tiny_token_gradients(backend, device=CPU):
    """Each token's gradient is 2**-16, as in a mean over 65536 tokens; at V = 512 the
    softmax entries p * g ~ 3e-8 are below fp16's smallest subnormal unless the gradient
    chunk is scaled. The head is scaled up (and hidden down) so that dH itself stays in
    fp16's normal range; dH's softmax part is a few % of its norm."""
    hidden, weight, targets, _ = make_inputs(16, 16, 512, torch.float16, ignore_frac=0.0,
                                             device=device)
    hidden, weight = (_leaf(t.detach() * s) for t, s in ((hidden, 0.125), (weight, 8.0)))
    loss = linear_logprobs(hidden, weight, targets, backend=backend).logprobs.sum() / 65536
    got = torch.autograd.grad(loss, hidden)[0]
    leaves, ref = _reference_of(hidden, weight, targets, None)
    want = torch.autograd.grad(ref.logprobs.sum() / 65536, leaves[0])[0]
    assert_grad_close(got, want, torch.float16, name="grad hidden")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fp16_keeps_the_softmax_term_of_a_tiny_per_token_gradient(backend):
    check_fp16_tiny_token_gradients(backend)


def check_mean_over_8192_tokens(backend, dtype, device=CPU, shape=(8192, 8, 1024)):
    """The real case: a mean over N = 8192 tokens, where p * g ~ 1e-7 is all but lost in an
    unscaled fp16 chunk and bf16 keeps 8 bits of it; the softmax term of dH and dW must
    survive on both gradient paths."""
    hidden, weight, targets, _ = make_inputs(*shape, dtype, ignore_frac=0.0, device=device)
    _, want = _cross_entropy_grads(hidden, weight, targets, None)
    for grad_in_forward in (True, False):
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend,
                                    grad_in_forward=grad_in_forward)
        got = torch.autograd.grad(loss, (hidden, weight))
        for name, g, w in zip(("hidden", "weight"), got, want):
            assert_grad_close(g, w, dtype, name=f"grad_in_forward={grad_in_forward}: "
                                               f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_mean_cross_entropy_over_8192_tokens_torch_backend(dtype):
    """On the torch backend only: the interpreter needs minutes for 8192 tokens, so the
    Triton backends meet this case on a GPU (``tests/kernels/test_cuda.py``) and, here, its
    fp16 crux in ``test_fp16_keeps_the_softmax_term_of_a_tiny_per_token_gradient``."""
    check_mean_over_8192_tokens("torch", dtype)


# --- filter_eps ------------------------------------------------------------------------------

def _filtered_reference_grads(hidden, weight, targets, upstream, eps):
    """dH, dW of sum(upstream * logprobs) with the softmax term dropped where p < eps."""
    h, w = hidden.detach().double(), weight.detach().double()
    probs = torch.softmax(h @ w.T, -1)
    valid = targets != -100
    onehot = F.one_hot(targets.clamp(min=0), w.shape[0]).double()
    grad = (onehot - torch.where(probs < eps, 0.0, probs)) * (upstream * valid)[:, None]
    return grad @ w, grad.T @ h


def check_filter_eps(backend, device=CPU):
    """filter_eps drops p < eps, not |gradient| < eps, so the loss's reduction does not
    change what is dropped (before: 2**-12 on a mean over 8192 tokens dropped everything)."""
    hidden, weight, targets, _ = make_inputs(12, 16, 40, torch.float32, device=device)
    cases = [(2.0 ** -6, 1.0), (2.0 ** -6, 1.0 / 8192), (float("inf"), 1.0)]
    for eps, scale in cases:  # an infinite eps drops every softmax term; one-hot terms stay
        upstream = torch.full(targets.shape, scale, dtype=F64, device=device)
        out = linear_logprobs(hidden, weight, targets, backend=backend, filter_eps=eps)
        got = torch.autograd.grad((out.logprobs * upstream).sum(), (hidden, weight))
        want = _filtered_reference_grads(hidden, weight, targets, upstream, eps)
        for name, g, w in zip(("hidden", "weight"), got, want):
            assert_grad_close(g, w, torch.float32, name=f"eps {eps}, scale {scale}: {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_filter_eps_compares_probabilities_whatever_the_loss_scale(backend):
    check_filter_eps(backend)


# --- NaN and inf rows ------------------------------------------------------------------------

def _poisoned_inputs(device):
    """Row 2's hidden is NaN; row 4's has one +inf coordinate k, so its logits are NaN
    where W[:, k] = 0 (columns 3 and 7) and +-inf elsewhere; the bias masks columns 10-12
    with -inf (legal: probability 0); row 5 targets a masked column; row 6 (NaN hidden) is
    ignored and must stay invisible."""
    hidden, weight, targets, bias = make_inputs(9, 8, 40, torch.float32, bias=True,
                                                ignore_frac=0.0, device=device)
    with torch.no_grad():
        k = 5
        weight[3, k] = weight[7, k] = 0.0
        weight[0, k] = 1.0  # column 0 is +inf in row 4: the first NaN (3) must still win
        hidden[2] = float("nan")
        hidden[4, k] = float("inf")
        hidden[6] = float("nan")
        bias[10:13] = float("-inf")
    targets[5] = 11
    targets[6] = -100
    return hidden, weight, targets, bias


def check_nan_contract(backend, device=CPU):
    hidden, weight, targets, bias = _poisoned_inputs(device)
    out = linear_logprobs(hidden, weight, targets, bias, backend=backend, return_lse=True,
                          return_argmax=True, return_entropy=True, return_logits_mean=True)
    logits = reference_logits(hidden.detach().double(), weight.detach().double(),
                              bias.detach().double())
    poisoned = torch.zeros(targets.shape, dtype=torch.bool, device=device)
    poisoned[[2, 4]] = True
    ignored = targets == -100
    clean = ~poisoned & ~ignored
    ref = linear_logprobs_reference(*[t.detach().double() for t in (hidden, weight)], targets,
                                    bias.detach().double(), return_lse=True, return_entropy=True,
                                    return_logits_mean=True)
    for name in ("logprobs", "lse", "entropy", "logits_mean"):
        got = getattr(out, name)
        assert got[poisoned].isnan().all(), name
        assert (got[ignored] == 0).all(), name
        assert_values_close(got[clean], getattr(ref, name)[clean], torch.float32, name=name)
    assert out.logprobs[5] == float("-inf")  # the target's logit is -inf: probability 0
    assert out.logits_mean[clean].isneginf().all()  # -inf logits in every clean row
    # argmax: torch.argmax's answer on every scored row (the first NaN where there is one)
    assert out.argmax[2] == 0 and out.argmax[4] == 3
    assert torch.equal(out.argmax[~ignored], logits.argmax(-1)[~ignored])
    assert out.argmax[6] == -100

    upstream = torch.randn(targets.shape, dtype=F64, device=device)
    loss = ((out.logprobs.double() + out.entropy.double()) * upstream).sum()  # NaN
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(loss, (hidden, weight, bias))
    # a poisoned row's gradient is NaN, so dW and dBias are NaN everywhere, as in torch
    assert grad_hidden[poisoned].isnan().all()
    assert grad_weight.isnan().all() and grad_bias.isnan().all()
    assert (grad_hidden[ignored] == 0).all()
    # the clean rows' dH is their reference gradient (rows are independent in dH)
    clean_hidden = hidden.detach()[clean].double().requires_grad_()
    ref_clean = linear_logprobs_reference(clean_hidden, weight.detach().double(),
                                          targets[clean], bias.detach().double(),
                                          return_entropy=True)
    want = torch.autograd.grad(((ref_clean.logprobs + ref_clean.entropy)
                                * upstream[clean]).sum(), clean_hidden)[0]
    assert_grad_close(grad_hidden[clean], want, torch.float32, name="clean rows of dH")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_and_inf_rows_follow_the_contract(backend):
    check_nan_contract(backend)


# --- logits in fp32 --------------------------------------------------------------------------

def check_fp32_logits(backend, device=CPU):
    """16-bit inputs, logits formed in fp32: bf16 logits rounded before the reduction are
    off by ~0.2 nats at a logit spread of 25, and fp16 logits above 65504 are inf."""
    for dtype, scale in ((torch.bfloat16, 25.0), (torch.float16, 3e5)):
        hidden, weight, targets, _ = make_inputs(12, 16, 64, dtype, device=device)
        hidden = _leaf(hidden.detach() * scale ** 0.5)
        weight = _leaf(weight.detach() * scale ** 0.5)
        out = linear_logprobs(hidden, weight, targets, backend=backend, return_lse=True)
        _, ref = _reference_of(hidden, weight, targets, None, return_lse=True)
        assert_values_close(out.logprobs, ref.logprobs, dtype, name=f"{dtype} logprobs")
        assert_values_close(out.lse, ref.lse, dtype, name=f"{dtype} lse")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_logits_are_formed_in_fp32_from_16_bit_inputs(backend):
    check_fp32_logits(backend)
