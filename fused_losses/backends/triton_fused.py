"""The fused Triton kernels as a backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Thin: the launchers in ``kernels/`` (installed as ``fused_losses.kernels``) already take the
interface's arguments (:mod:`fused_losses.backends`). The forward walks logit tiles with an
online log-sum-exp; the backward recomputes each tile once per vocabulary chunk and feeds the
chunk's logit gradient to the dH and dW GEMMs (8NHV with the forward). ``forward_backward``
is the one pass (6NHV, ``_one_pass.py``) with Triton GEMMs: the products kernel
(``kernels/products.py``) and the backward's dH and dW kernels. Importing this module imports
Triton.
"""
import torch

from ..kernels import _launch, configs
from ..kernels.logprobs_bwd import backward, grad_hidden_gemm, grad_weight_gemm
from ..kernels.logprobs_fwd import forward
from ..kernels.products import products
from . import _one_pass

NAME = "triton"
OPTIONS = frozenset()  # the kernels tile by themselves: no chunk_size
# forward_backward's largest group of fp32 logits: a bigger group takes forward + backward.
ONE_PASS_BYTES = configs.ONE_PASS_BYTES

__all__ = ["forward", "backward", "forward_backward"]


class _TritonGemms:
    """The one pass's GEMMs as Triton kernels; hidden rows are read through ``rows``."""

    @staticmethod
    def rows(hidden, rows):
        return hidden, rows

    @staticmethod
    def products(operand, weight, out):
        hidden, rows = operand
        products(hidden, weight, rows, out)

    @staticmethod
    def grad_hidden(grad, weight):
        out = torch.zeros(grad.shape[0], weight.shape[1], dtype=torch.float32,
                          device=grad.device)
        grad_hidden_gemm(grad, weight, 0, out, grad, _launch.config("bwd", weight),
                         filtered=False)
        return out

    @staticmethod
    def grad_weight(grad, operand, accumulator, scale):
        hidden, rows = operand
        grad_weight_gemm(grad, hidden, rows, 0, accumulator, grad,
                         None if scale is None else scale.ratio,
                         None if scale is None else scale.max_bound,
                         _launch.config("bwd", hidden), filtered=False, accumulate=True)


@torch.no_grad()
def forward_backward(hidden, weight, bias, rows, targets, head, *, boundaries=None,
                     need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
                     softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
                     with_logits_mean=False, chunk_rows=None):
    """The interface's one pass with Triton GEMMs (``_one_pass.run``); returns (loss, dH, dW,
    dBias). ``chunk_rows``: rows per chunk (default ``configs.ONE_PASS_ROWS``)."""
    _launch.check_inputs(hidden, weight, bias)
    bias, rows, targets = _launch.contiguous(bias, rows, targets)
    return _one_pass.run(_TritonGemms, torch.float32, hidden, weight, bias, rows, targets, head,
                         boundaries=boundaries, need_hidden=need_hidden,
                         need_weight=need_weight, need_bias=need_bias, temperature=temperature,
                         softcap=softcap, filter_eps=filter_eps, with_argmax=with_argmax,
                         with_entropy=with_entropy, with_logits_mean=with_logits_mean,
                         chunk_rows=chunk_rows)
