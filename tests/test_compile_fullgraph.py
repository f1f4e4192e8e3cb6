"""torch.compile(fullgraph=True) over the primitive and the losses built on it: no graph
break, results and gradients equal to eager. The primitive is one custom op there
(``fused_losses::linear_logprobs``) with a fake implementation and autograd."""
import pytest
import torch

import fused_losses as fl
from tests.helpers import BACKEND_PARAMS, assert_close, make_inputs

B, T, H, V = 4, 6, 16, 40


def _batch():
    hidden, weight, _, _ = make_inputs(B, H, V, torch.float32, lead=(B, T))
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100  # a prompt
    ref = torch.randn(B, T, dtype=torch.float64) * 0.1 - 3.0
    return hidden, weight, labels, ref


LOSSES = {
    "linear_logprobs": lambda h, w, y, ref, backend: _logprobs_loss(h, w, y, backend),
    "linear_cross_entropy": lambda h, w, y, ref, backend: fl.linear_cross_entropy(
        h, w, y, shift=True, num_items_in_batch=torch.tensor(13), backend=backend),
    "sft_loss": lambda h, w, y, ref, backend: fl.sft_loss(h, w, y, ref_logprobs=ref,
                                                          backend=backend).loss,
    "dpo_loss": lambda h, w, y, ref, backend: fl.dpo_loss(h, w, y, ref_logprobs=ref,
                                                          backend=backend).loss,
}


def _logprobs_loss(hidden, weight, labels, backend):
    out = fl.linear_logprobs(hidden, weight, labels, return_entropy=True, return_argmax=True,
                             backend=backend)
    hits = (out.argmax == labels).float().sum()  # argmax is usable, not differentiable
    return out.logprobs.sum() - 0.1 * out.entropy.sum() + 0.0 * hits


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", LOSSES)
def test_fullgraph_compile_equals_eager(backend, name):
    hidden, weight, labels, ref = _batch()
    loss_fn = LOSSES[name]
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w: loss_fn(h, w, labels, ref, backend), fullgraph=True,
                             backend="aot_eager")
    got = compiled(hidden, weight)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    want = loss_fn(hidden, weight, labels, ref, backend)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    assert_close(got, want.detach(), torch.float32, name=name)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, torch.float32, name=f"{name} gradient")


def test_inductor_compiles_around_the_op():
    hidden, weight, labels, _ = _batch()
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w: fl.linear_cross_entropy(h, w, labels, shift=True),
                       fullgraph=True)
    got = fn(hidden, weight)
    assert_close(got, fl.linear_cross_entropy(hidden, weight, labels, shift=True).detach(),
                 torch.float32)


def test_bad_target_ids_are_still_an_error_when_compiled():
    hidden, weight, labels, _ = _batch()
    labels[0, 3] = V
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w: fl.linear_logprobs(h, w, labels).logprobs.sum(),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"targets .*outside \[0, 40\)"):
        fn(hidden, weight)


def test_linear_logprobs_loss_says_it_does_not_trace():
    hidden, weight, labels, _ = _batch()
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w: fl.linear_logprobs_loss(
        h, w, labels, lambda s, p: s.logprobs.sum()), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="linear_logprobs_loss cannot be traced"):
        fn(hidden, weight)


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_double_backward_when_compiled_is_a_clear_error(compiler):
    """Compiled, the primitive is the custom op: AOTAutograd (every backend but dynamo's
    "eager") refuses double backward itself; without it the op's own backward says so."""
    hidden, weight, labels, _ = _batch()
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w: fl.linear_logprobs(h, w, labels, backend="torch")
                       .logprobs.sum(), fullgraph=True, backend=compiler)
    loss = fn(hidden, weight)
    grad_hidden, = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (loss + grad_hidden.square().sum()).backward()
