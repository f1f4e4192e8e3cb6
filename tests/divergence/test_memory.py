"""Never a [N, V] tensor (issue 14 item 2): ``linear_divergence`` (recompute in backward) and
``distill_loss`` (its default path: gradients formed in forward on torch and cuBLAS),
forward and backward, on every backend, with N·V large against the chunk budget.

Every tensor an ATen op returns is recorded (``tests.helpers.LargestTensors``), so a
logits-sized buffer, temporary or gradient of either model is caught wherever it is made.
Chunk budgets: ``chunk_size`` tokens on the torch backend; under the Triton interpreter the
Triton and cuBLAS backends take a few KiB per chunk by themselves (``kernels/configs.py``,
``INTERPRETER_*_BYTES``: 10 rows or 1024 fp32 products at V = 101). Tiles inside the
interpreted kernels are numpy arrays, bounded by the block configs, and are not seen here.
"""
import pytest
import torch

from fused_losses import distill_loss
from fused_losses.divergence import linear_divergence
from tests.divergence import naive
from tests.divergence.test_divergence import heads, leaves
from tests.helpers import BACKEND_PARAMS, LargestTensors

B, T, V = 2, 13, 101  # 26 positions, 23 scored by distill_loss's shifted labels
CHUNK_ROWS = 4  # the torch backend's chunk


def _inputs():
    """float32 student leaves (hidden, weight, bias), the teacher's head, targets [B·T]
    (H = 8 and H_t = 6: each head is far below [N, V])."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=B * T, h=8, ht=6, v=V,
                                                                      ignored=(3,))
    student = leaves((hidden, weight, bias), torch.float32)
    return student, (t_hidden.float(), t_weight.float(), t_bias.float()), targets


def _linear_divergence(backend, chunk_size):
    """Runs forward and backward; returns the student's leaves and N, the scored tokens."""
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), targets = _inputs()
    out = linear_divergence(hidden, weight, t_hidden, t_weight, targets, bias=bias,
                            teacher_bias=t_bias, divergence="reverse_kl",
                            return_logprobs=True, backend=backend, chunk_size=chunk_size)
    (out.divergence.sum() - 0.5 * out.logprobs.sum()).backward()
    return (hidden, weight, bias), int((targets != -100).sum())


def _distill_loss(backend, chunk_size):
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), targets = _inputs()
    labels = targets.view(B, T)
    distill_loss(hidden.view(B, T, -1), weight, t_hidden.view(B, T, -1), t_weight, labels,
                 bias=bias, teacher_bias=t_bias, divergence="jsd", beta=0.3, hard_weight=0.5,
                 backend=backend, chunk_size=chunk_size).loss.backward()
    return (hidden, weight, bias), int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("run", [_linear_divergence, _distill_loss],
                         ids=["linear_divergence", "distill_loss"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_no_logits_sized_tensor_forward_or_backward(backend, run):
    chunk_size = CHUNK_ROWS if backend == "torch" else None
    with LargestTensors(V) as seen:
        student, scored = run(backend, chunk_size)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student)  # backward ran
    assert seen.rows < scored and seen.elements < scored * V, (seen.rows, seen.elements)


def test_the_check_catches_an_unchunked_head():
    """The assertion above can fail: one chunk of every token, or the materialised
    reference, forms [N, V] logits and is seen."""
    with LargestTensors(V) as seen:
        _, scored = _linear_divergence("torch", chunk_size=B * T)
    assert seen.rows >= scored and seen.elements >= scored * V
    (hidden, weight, bias), (t_hidden, t_weight, t_bias), targets = _inputs()
    with LargestTensors(V) as seen:
        divergence, _ = naive.per_token(hidden, weight, t_hidden, t_weight, targets, bias=bias,
                                        teacher_bias=t_bias, kind="reverse_kl")
        divergence.sum().backward()
    assert seen.rows >= scored and seen.elements >= scored * V
