"""linear_logprobs on both backends against the float64 materialised reference."""
import itertools
import re

import pytest
import torch

from fused_losses import (distill_loss, linear_divergence, linear_divergence_loss,
                          linear_logprobs, linear_logprobs_loss)
from tests.helpers import (BACKEND_PARAMS, OUTPUTS, check_against_reference,
                           make_inputs)

def dtypes(backend: str) -> list[torch.dtype]:
    """The input dtypes a backend takes: float64 only on the torch backend."""
    extra = [torch.float64] if backend == "torch" else []
    return extra + [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", ["plain", "bias_temperature", "softcap", "everything"])
def test_matches_reference_per_dtype(backend, case):
    for dtype in dtypes(backend):
        hidden, weight, targets, bias = make_inputs(13, 37, 101, dtype,
                                                    bias=case in ("bias_temperature", "everything"))
        kwargs = {}
        if case in ("bias_temperature", "everything"):
            kwargs["temperature"] = 0.7
        if case in ("softcap", "everything"):
            kwargs["softcap"] = 2.5
        check_against_reference(backend, dtype, hidden, weight, targets, bias, **kwargs)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_combination_of_upstream_gradients(backend):
    """Each subset of {logprobs, lse, entropy, logits_mean} receiving a gradient."""
    for size in range(len(OUTPUTS) + 1):
        for subset in itertools.combinations(OUTPUTS, size):
            hidden, weight, targets, bias = make_inputs(9, 19, 67, torch.float32, bias=True)
            check_against_reference(backend, torch.float32, hidden, weight, targets, bias,
                                    with_grads=subset, softcap=3.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_outputs_not_requested_are_none(backend):
    hidden, weight, targets, _ = make_inputs(5, 16, 33, torch.float32)
    out = linear_logprobs(hidden, weight, targets, backend=backend)
    assert out.lse is None and out.argmax is None and out.entropy is None
    assert out.logits_mean is None
    check_against_reference(backend, torch.float32, hidden, weight, targets, None,
                            return_lse=False, return_argmax=False, return_entropy=False,
                            return_logits_mean=False, with_grads=("logprobs",))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", [
    dict(n=7, h=37, v=1), dict(n=1, h=16, v=1001), dict(n=7, h=5, v=1001),
    dict(n=40, h=33, v=65), dict(lead=(2, 3, 5), h=17, v=50)],
    ids=["V=1", "one-token", "V-off-block", "many-token-tiles", "3d"])
def test_odd_shapes(backend, shape):
    lead = shape.get("lead") or (shape["n"],)
    hidden, weight, targets, bias = make_inputs(lead[0], shape["h"], shape["v"], torch.float32,
                                                bias=True, lead=lead)
    check_against_reference(backend, torch.float32, hidden, weight, targets, bias,
                            temperature=1.3)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_ignored_gives_zeros_and_zero_grads(backend):
    hidden, weight, targets, bias = make_inputs(6, 16, 40, torch.float32, bias=True)
    targets.fill_(-100)
    out = linear_logprobs(hidden, weight, targets, bias, backend=backend, return_lse=True,
                          return_entropy=True, return_argmax=True)
    assert (out.logprobs == 0).all() and (out.lse == 0).all() and (out.entropy == 0).all()
    assert (out.argmax == -100).all()
    (out.logprobs.sum() + out.lse.sum() + out.entropy.sum()).backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ignored_rows_get_zero_gradient_and_custom_ignore_index(backend):
    hidden, weight, targets, _ = make_inputs(10, 16, 40, torch.float32, ignore_index=7,
                                             ignore_frac=0.5)
    targets[0] = 7
    out = linear_logprobs(hidden, weight, targets, backend=backend, ignore_index=7)
    out.logprobs.sum().backward()
    ignored = targets == 7
    assert (out.logprobs[ignored] == 0).all()
    assert (hidden.grad[ignored] == 0).all()
    assert (hidden.grad[~ignored] != 0).any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_deterministic_bitwise(backend):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        hidden, weight, targets, bias = make_inputs(21, 24, 130, torch.float32, bias=True)
        out = linear_logprobs(hidden, weight, targets, bias, backend=backend, return_lse=True,
                              return_entropy=True, deterministic=True)
        (out.logprobs.sum() + out.entropy.sum() * 0.3).backward()
        runs.append([out.logprobs, out.lse, hidden.grad, weight.grad, bias.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gradient_filtering_is_opt_in(backend):
    hidden, weight, targets, _ = make_inputs(9, 16, 70, torch.float32)
    exact = linear_logprobs(hidden, weight, targets, backend=backend).logprobs
    g_exact = torch.autograd.grad(exact.sum(), (hidden, weight))
    filtered = linear_logprobs(hidden, weight, targets, backend=backend, filter_eps=0.0)
    g_zero_eps = torch.autograd.grad(filtered.logprobs.sum(), (hidden, weight))
    for a, b in zip(g_exact, g_zero_eps):
        torch.testing.assert_close(a, b)  # eps = 0 filters nothing (what it does filter:
        # tests/backends/test_contract.py)


@pytest.fixture
def one_process_group():
    """The default process group, of one gloo process: vocabulary parallelism over a single
    shard, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _teacher(hidden, vocab):
    """A teacher head of its own width for ``hidden``'s tokens; it gets no gradient."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(*hidden.shape[:-1], 5, generator=g), torch.randn(vocab, 5, generator=g)


# Every autograd Function (as the error names it), reached through a public function:
# route -> (Function, (hidden [N, H], weight, targets [N], backend, process group) -> loss).
DOUBLE_BACKWARD_LOSSES = {
    "linear_logprobs": ("LinearLogProbsFunction", lambda h, w, t, backend, group:
                        linear_logprobs(h, w, t, backend=backend).logprobs.sum()),
    "linear_logprobs_loss": ("GradInForwardFunction", lambda h, w, t, backend, group:
                             linear_logprobs_loss(h, w, t, lambda stats, _: stats.logprobs.sum(),
                                                  backend=backend)),
    "vocab_parallel": ("VocabParallelLogProbsFunction", lambda h, w, t, backend, group:
                       linear_logprobs(h, w, t, backend=backend, process_group=group,
                                       return_entropy=True).entropy.sum()),
    "custom_op": ("the custom op fused_losses::linear_logprobs", lambda h, w, t, backend, group:
                  torch.ops.fused_losses.linear_logprobs(h, w, None, t, -100, 1.0, None, backend,
                                                         None, None, False, False, False)[0].sum()),
    "linear_divergence": ("LinearDivergenceFunction", lambda h, w, t, backend, group:
                          linear_divergence(h, w, *_teacher(h, w.shape[0]), t,
                                            backend=backend).divergence.sum()),
    "linear_divergence_loss": ("DivergenceLossFunction", lambda h, w, t, backend, group:
                               linear_divergence_loss(h, w, *_teacher(h, w.shape[0]), t,
                                                      hard_weight=0.5, backend=backend,
                                                      grad_in_forward=True)[0]),
    "distill_loss": ("LinearDivergenceFunction", lambda h, w, t, backend, group: distill_loss(
        h[None], w, *_teacher(h[None], w.shape[0]), t[None], divergence="reverse_kl",
        backend=backend, grad_in_forward=False).loss),
}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("route", DOUBLE_BACKWARD_LOSSES)
def test_double_backward_is_a_clear_error(backend, route, request):
    """A penalty on a gradient (create_graph=True) needs the backward's own gradient; no
    Function provides one, and each says so instead of dropping the penalty silently."""
    group = request.getfixturevalue("one_process_group") if route == "vocab_parallel" else None
    function, loss_of = DOUBLE_BACKWARD_LOSSES[route]
    hidden, weight, targets, _ = make_inputs(6, 8, 20, torch.float32)
    loss = loss_of(hidden, weight, targets, backend, group)
    grad_hidden, = torch.autograd.grad(loss, hidden, create_graph=True)
    penalty = grad_hidden.square().sum()
    with pytest.raises(RuntimeError, match=f"{re.escape(function)} has no double backward"):
        (loss + penalty).backward()


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("case", ["autocast", "bf16_hidden_fp32_head"])
def test_autocast_and_mixed_dtypes_behave_as_F_linear(backend, grad_in_forward, case):
    """Under autocast the head runs in the autocast dtype (the result is the float64
    reference of the bf16-rounded inputs); without it, mixed dtypes promote as torch does
    (a bf16 hidden with an fp32 head runs in fp32). Each input gets its gradient in its own
    dtype, on both gradient paths."""
    from fused_losses import linear_cross_entropy
    from fused_losses.reference import linear_cross_entropy_reference
    from tests.helpers import GRAD_TOL, assert_grad_close, assert_values_close
    hidden, weight, targets, bias = make_inputs(10, 16, 50, torch.float64, bias=True)
    if case == "autocast":
        leaves = _leaves(hidden, weight, bias, dtype=torch.float32)
        compute = torch.bfloat16
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        leaves = _leaves(hidden, dtype=torch.bfloat16) + _leaves(weight, bias,
                                                                 dtype=torch.float32)
        compute = torch.float32
        context = torch.autocast("cpu", enabled=False)
    with context:
        loss = linear_cross_entropy(*leaves[:2], targets, leaves[2], backend=backend,
                                    grad_in_forward=grad_in_forward, softcap=5.0)
    grads = torch.autograd.grad(loss, leaves)
    # the reference sees what the head computed on: the inputs rounded to the compute dtype
    ref_leaves = [t.detach().to(compute).double().requires_grad_() for t in leaves]
    want = linear_cross_entropy_reference(*ref_leaves[:2], targets, ref_leaves[2], softcap=5.0)
    assert loss.dtype == torch.float32
    assert_values_close(loss, want, compute, name="loss")
    for name, got, leaf, ref in zip(("hidden", "weight", "bias"), grads, leaves,
                                    torch.autograd.grad(want, ref_leaves)):
        assert got.dtype == leaf.dtype, name  # fp32 master weights keep fp32 gradients
        coarser = max(compute, leaf.dtype, key=lambda d: GRAD_TOL[d])  # bf16 hidden's dH
        assert_grad_close(got, ref, coarser, backend=backend, name=f"grad {name}")
