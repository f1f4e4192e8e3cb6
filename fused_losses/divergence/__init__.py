"""Distillation's primitive: per-token divergences between two fused LM heads.

The student's logits ``z = hidden @ weight.T + bias`` and the teacher's
``z_T = teacher_hidden @ teacher_weight.T + teacher_bias`` (each head its own H, one shared
vocabulary) are never materialised: an implementation walks both in tiles (Triton) or row
chunks (PyTorch), keeps O(tokens) statistics, and recomputes them in backward.

Per scored token, with ``s = z/τ``, ``t = z_T/τ``, Q = softmax(s) (student),
P = softmax(t) (teacher), ``δ_v = log P_v − log Q_v`` (``objectives.md`` §9):

* ``forward_kl``: D = KL(P‖Q) = Σ_v P_v δ_v.
* ``reverse_kl``: D = KL(Q‖P) = −Σ_v Q_v δ_v.
* ``jsd`` (TRL GKD's generalised JSD), 0 < β < 1, M = βP + (1−β)Q:
  D = β·KL(P‖M) + (1−β)·KL(Q‖M). With ``d_v = δ_v + log(β/(1−β))``,
  ``log M_v = log((1−β)Q_v) + σ⁺(d_v)`` (σ⁺ = softplus), so
  KL(Q‖M) = −log(1−β) − S, S = Σ Q σ⁺(d);  KL(P‖M) = −log β − R, R = Σ P σ⁺(−d);
  D = H(β) − βR − (1−β)S with H(β) = −β log β − (1−β) log(1−β). β = 0 is forward KL and
  β = 1 reverse KL by definition (as TRL and Liger special-case them; D → 0 at both ends).

Gradients w.r.t. the student's tempered logits s (the teacher gets none), from
dQ_u/ds_v = Q_u(1[u=v] − Q_v):

* forward_kl: dD/ds_v = −Σ_u P_u (1[u=v] − Q_v) = Q_v − P_v. Needs lse_s and lse_t.
* reverse_kl: dD/ds_v = Σ_u Q_u(1[u=v] − Q_v)(−δ_u + 1) = −Q_v(δ_v + D). Needs D per token.
* jsd: D = βΣP log P + (1−β)ΣQ log Q − ΣM log M, so ∂D/∂Q_u = (1−β)(log Q_u − log M_u) and
  dD/ds_v = (1−β)Q_v(log Q_v − log M_v − KL(Q‖M)) = −(1−β)Q_v(σ⁺(d_v) − S). Needs S.

So backward needs, per token, lse of s and of t and ``aux`` (D for reverse KL, S for JSD):
[N] statistics from forward, never a tile. The upstream gradients ``g_D`` (of the
divergence) and ``g_lp`` (of ``logprobs``, the student's log-prob of the target at
temperature 1, for the hard cross-entropy term) make the raw-logit gradient

    dL/dz = (g_D/τ)·dD/ds + g_lp·(onehot(y) − softmax(z)).

Non-finite logits, as for the log-prob primitive (``fused_losses.backends``), the same on
every implementation:

* A ``-inf`` logit (a vocabulary mask, e.g. a bias of ``-inf`` on padded rows) has
  probability 0: its terms are 0 (0·log 0 = 0, in the mixture's too) and its gradient is 0.
  Both models may mask, the same tokens or different ones.
* Where one model has mass on a token the other masks, the KL that integrates against the
  first is +inf: forward KL when the student masks a token the teacher supports, reverse KL
  the other way round. The JSD stays finite (M > 0 wherever P or Q is). An infinite
  divergence has no derivative: its row's gradient is NaN (so dW and dBias are NaN, as with
  a NaN row), which a loss scaler skips like any overflow.
* A NaN or ``+inf`` logit, or a row whose logits are all ``-inf``, in either model makes the
  row's divergence, statistics and gradient row NaN. Ignored rows are never read.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ..primitive import (cast_to_compute_dtype, check_options, compute_dtype, first_order_only,
                         no_autocast, validate)
from ..backends import BACKENDS, CUDA_DEFAULT
from . import torch_chunked, triton_fused

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
Backend = Literal["auto", "torch", "triton", "cublas"]


class DivergenceOutput(NamedTuple):
    """Per-token outputs of :func:`linear_divergence`, shaped like ``targets``; float32
    (float64 for float64 inputs), 0 at ignored positions; ``logprobs`` None unless asked."""

    divergence: torch.Tensor
    logprobs: torch.Tensor | None = None


class Stats(NamedTuple):
    """What an implementation's ``forward`` returns, [N] each over the scored rows."""

    divergence: torch.Tensor
    logprobs: torch.Tensor | None
    lse: torch.Tensor          # student, tempered
    teacher_lse: torch.Tensor  # teacher, tempered
    raw_lse: torch.Tensor | None  # student at temperature 1, when τ ≠ 1 and logprobs
    aux: torch.Tensor | None   # D (reverse_kl), S (jsd), None (forward_kl)


@dataclass(frozen=True)
class Options:
    """Everything the implementations need besides tensors."""

    kind: str              # "forward_kl" | "reverse_kl" | "jsd" (then 0 < beta < 1)
    beta: float
    temperature: float
    with_logprobs: bool
    chunk_size: int | None = None  # torch implementation only

    def kwargs(self) -> dict:
        kwargs = dict(kind=self.kind, beta=self.beta, temperature=self.temperature,
                      with_logprobs=self.with_logprobs)
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        return kwargs


def divergence_kind(divergence: str, beta: float) -> str:
    """``jsd`` at β = 0 is forward KL and at β = 1 reverse KL (TRL's and Liger's convention)."""
    if divergence == "jsd" and beta in (0, 1):
        return "forward_kl" if beta == 0 else "reverse_kl"
    return divergence


# ---------------------------------------------------------------------------------------------
# Input checking: every error names the argument, what came and what was expected.
# ---------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def validate_teacher(hidden, weight, teacher_hidden, teacher_weight, teacher_bias) -> None:
    """The teacher's head against the (already validated) student's."""
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"{_describe(name, t)}: expected device {hidden.device} (of hidden)")
    if type(teacher_weight).__name__ == "DTensor":
        raise TypeError("teacher_weight is a DTensor shard, not the full [V, H_t] weight; "
                        "gather it (e.g. call the loss inside the teacher's forward under FSDP)")
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{_describe(name, t)}: expected a floating dtype {_FLOATS}")
    # as for the student: 16/32-bit may mix (promoted), float64 only with float64
    for name, t in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if isinstance(t, torch.Tensor) and (t.dtype == torch.float64) != (
                teacher_hidden.dtype == torch.float64):
            raise TypeError(f"{_describe(name, t)}: float64 mixes only with float64; "
                            f"teacher_hidden is {teacher_hidden.dtype}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(hidden.shape[:-1]) or teacher_hidden.dim() < 1:
        raise ValueError(f"{_describe('teacher_hidden', teacher_hidden)}: expected shape "
                         f"[{', '.join(map(str, hidden.shape[:-1]))}, H_t], the leading shape "
                         f"of {_describe('hidden', hidden)} (one teacher state per token)")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"{_describe('teacher_weight', teacher_weight)}: expected shape "
                         f"[V, {teacher_hidden.shape[-1]}] (H_t of teacher_hidden)")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{_describe('teacher_weight', teacher_weight)} has a vocabulary of "
            f"{teacher_weight.shape[0]} but {_describe('weight', weight)} has "
            f"{weight.shape[0]}: distillation needs one shared vocabulary (same tokenizer; "
            f"slice a padded head to the real vocabulary)")
    if teacher_bias is not None:
        if not isinstance(teacher_bias, torch.Tensor):
            raise TypeError(f"teacher_bias must be a torch.Tensor or None, got "
                            f"{type(teacher_bias).__name__}")
        if tuple(teacher_bias.shape) != (weight.shape[0],) \
                or teacher_bias.dtype not in _FLOATS or teacher_bias.device != hidden.device:
            raise ValueError(f"{_describe('teacher_bias', teacher_bias)}: expected shape "
                             f"[{weight.shape[0]}], a floating dtype on {hidden.device}")


def check_divergence(divergence, beta) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def _load(backend: str):
    """The implementation module of a concrete backend; ImportError without Triton."""
    if backend == "torch":
        return torch_chunked
    if backend == "triton":
        triton_fused.available()  # raise ImportError now (at dispatch), not at the first launch
        return triton_fused
    return importlib.import_module(".cublas_epilogue", __name__)  # imports Triton


def resolve_implementation(backend: str, device: torch.device):
    """The implementation module for ``backend`` on ``device``; errors list the valid names.

    The same names as the log-prob primitive (``fused_losses.BACKENDS``), one implementation
    each: ``"auto"`` is ``fused_losses.backends.CUDA_DEFAULT`` on CUDA when Triton imports
    (the library's CUDA default, a prediction in ``benchmarks/notes.md``), else ``"torch"``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} for distillation, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return torch_chunked
        try:
            return _load(CUDA_DEFAULT)
        except ImportError:
            return torch_chunked
    if backend != "torch" and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (got device {device}); CPU tensors run "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before importing "
            "triton)")
    try:
        return _load(backend)
    except ImportError as err:
        raise ValueError(f"backend={backend!r} needs Triton, which does not import here "
                         f"({err}); use backend='torch'") from err


def _prepare(hidden, weight, teacher_hidden, teacher_weight, targets, bias, teacher_bias, *,
             divergence, beta, temperature, ignore_index, backend, chunk_size, with_logprobs):
    """Validate, flatten both heads' states to [M, ·] and list the scored rows."""
    validate(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
             softcap=None, check_target_range=with_logprobs)
    validate_teacher(hidden, weight, teacher_hidden, teacher_weight, teacher_bias)
    check_divergence(divergence, beta)
    check_options(chunk_size=chunk_size)
    impl = resolve_implementation(backend, hidden.device)
    if chunk_size is not None and impl is not torch_chunked:
        raise ValueError(f"chunk_size={chunk_size} (tokens per chunk) applies to "
                         "backend='torch' only; the Triton kernels tile by themselves and "
                         "the cuBLAS chunks are sized by memory (kernels/configs.py)")
    flat_targets = targets.reshape(-1)
    # Ignored rows are never visited: they cost no FLOPs and get zero gradient.
    rows = (flat_targets != ignore_index).nonzero().squeeze(-1)
    opts = Options(kind=divergence_kind(divergence, beta), beta=float(beta),
                   temperature=float(temperature), with_logprobs=with_logprobs,
                   chunk_size=chunk_size)
    # Each head runs in its own compute dtype (as F.linear decides it: autocast's, else the
    # promotion of its tensors); the student's casts are autograd ops, so each of its inputs
    # gets its gradient in its own dtype. The teacher gets none.
    hidden, weight, bias = cast_to_compute_dtype(hidden, weight, bias)
    teacher_dtype = compute_dtype(teacher_hidden, teacher_weight, teacher_bias)
    teacher_hidden, teacher_weight, teacher_bias = (
        None if t is None else t.detach().to(teacher_dtype)
        for t in (teacher_hidden, teacher_weight, teacher_bias))
    tensors = (hidden.reshape(-1, hidden.shape[-1]), weight, bias,
               teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
               teacher_bias, rows, flat_targets.index_select(0, rows).long())
    return impl, opts, tensors


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

def _scatter(values: torch.Tensor | None, rows: torch.Tensor, size: int):
    if values is None:
        return None
    return values.new_zeros(size).index_copy_(0, rows, values)


def _zero_grads(hidden, weight, bias, needs):
    return tuple(torch.zeros_like(t) if (t is not None and need) else None
                 for t, need in zip((hidden, weight, bias), needs[:3]))


class LinearDivergenceFunction(torch.autograd.Function):
    """Forward: [N] statistics of both heads. Backward: recompute both heads' tiles.

    Saves the inputs and [N]-sized statistics only. The teacher's tensors get no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                targets, impl, opts: Options):
        stats = Stats(*impl.forward(hidden, weight, bias, teacher_hidden, teacher_weight,
                                    teacher_bias, rows, targets, **opts.kwargs()))
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight,
                              teacher_bias, rows, targets, stats.divergence, stats.lse,
                              stats.teacher_lse, stats.raw_lse, stats.aux)
        ctx.impl, ctx.opts = impl, opts
        ctx.set_materialize_grads(False)
        size = hidden.shape[0]
        return _scatter(stats.divergence, rows, size), _scatter(stats.logprobs, rows, size)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_divergence, grad_logprobs):
        (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
         divergence, lse, teacher_lse, raw_lse, aux) = ctx.saved_tensors
        # Upstream grads of any strides (an expanded sum's are stride 0) become [N] rows.
        grads = [None if g is None else g.index_select(0, rows).to(lse.dtype).contiguous()
                 for g in (grad_divergence, grad_logprobs)]
        if grads[0] is not None:  # an infinite divergence's row has a NaN gradient
            grads[0] = torch_chunked.finite_or_nan(grads[0], divergence)
        nothing = (None,) * 7
        if all(g is None for g in grads) or rows.numel() == 0:
            return _zero_grads(hidden, weight, bias, ctx.needs_input_grad) + nothing
        stats = Stats(None, None, lse, teacher_lse, raw_lse, aux)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        input_grads = ctx.impl.backward(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
            stats, *grads, need_hidden=need_hidden, need_weight=need_weight,
            need_bias=need_bias, **ctx.opts.kwargs())
        return tuple(input_grads) + nothing


class DivergenceLossFunction(torch.autograd.Function):
    """``Σ_rows D − hard_weight·logprobs`` with the student's gradients formed in forward.

    With an implementation's one-pass ``forward_backward`` (torch, cublas) each chunk's
    logits are formed once (4 GEMMs instead of 6); elsewhere forward then backward run here.
    dW is held from forward to backward; backward only scales by the incoming scalar (once).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                targets, impl, opts: Options, hard_weight: float):
        heads = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                 targets)
        needs = dict(need_hidden=hidden.requires_grad, need_weight=weight.requires_grad,
                     need_bias=bias is not None and bias.requires_grad)
        one_pass = getattr(impl, "forward_backward", None)
        if one_pass is not None:
            loss, stats, *input_grads = one_pass(
                *heads, divergence_weight=1.0, logprob_weight=-hard_weight, **needs,
                **opts.kwargs())
            stats = Stats(*stats)
        else:
            stats = Stats(*impl.forward(*heads, **opts.kwargs()))
            ones = torch.ones_like(stats.lse)
            loss = stats.divergence.sum()
            logprob_grad = None
            if opts.with_logprobs:
                loss = loss - hard_weight * stats.logprobs.sum()
                logprob_grad = ones * -hard_weight
            input_grads = impl.backward(*heads, stats, ones, logprob_grad, **needs,
                                        **opts.kwargs())
        # Stashed on ctx, not saved: outputs of this Function's own work, scaled in place.
        ctx.input_grads = tuple(input_grads)
        size = hidden.shape[0]
        divergence = _scatter(stats.divergence, rows, size)
        logprobs = _scatter(stats.logprobs, rows, size)
        ctx.mark_non_differentiable(*(t for t in (divergence, logprobs) if t is not None))
        return loss, divergence, logprobs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _grad_divergence, _grad_logprobs):
        if ctx.input_grads is None:
            raise RuntimeError("a distillation loss whose gradients were formed in forward can "
                               "be backpropagated once; pass grad_in_forward=False to "
                               "backpropagate through it more than once")
        grads, ctx.input_grads = ctx.input_grads, None
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return scaled + (None,) * 8


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_logprobs: bool = False,
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> DivergenceOutput:
    """Per-token divergence between the teacher's and the student's next-token distributions.

    ``D_i = div(P_i, Q_i)`` with ``Q = softmax((hidden @ weight.T + bias)/τ)`` and
    ``P = softmax((teacher_hidden @ teacher_weight.T + teacher_bias)/τ)`` over the whole
    vocabulary, for every position whose target is not ``ignore_index``; neither model's
    ``[N, V]`` logits are formed. Formulas and gradients: this module's docstring.

    Args:
        hidden (Tensor): [..., H] student states; float32, bfloat16, float16 (or float64 on
            the torch backend).
        weight (Tensor): [V, H] student head on ``hidden``'s device. Each head runs in its
            own compute dtype, as ``F.linear`` decides it (autocast's when autocast is on,
            else the promotion of its tensors; float64 only with float64); logits are formed
            in fp32 either way and each student tensor gets its gradient in its own dtype.
        teacher_hidden (Tensor): [..., H_t] teacher states, same leading shape as ``hidden``;
            H_t may differ from H, the dtype from the student's. No gradient.
        teacher_weight (Tensor): [V, H_t]; the same V as ``weight``. No gradient.
        targets (LongTensor): [...] (the leading shape of ``hidden``); only which positions
            equal ``ignore_index`` matters, unless ``return_logprobs``: then ids in [0, V).
            Aligned: ``targets[i]`` belongs to ``hidden[i]`` (no shift).
        bias (Tensor, optional): [V] student bias. Default: None.
        teacher_bias (Tensor, optional): [V] teacher bias. Default: None.
        divergence (str): ``"forward_kl"`` KL(P‖Q), ``"reverse_kl"`` KL(Q‖P) or ``"jsd"``
            (generalised JSD, mixture βP + (1−β)Q). Default: "jsd".
        beta (float): in [0, 1]; JSD's mixture weight of the teacher. β = 0 gives forward KL
            and β = 1 reverse KL exactly. Ignored by the KL divergences. Default: 0.5.
        temperature (float): > 0; divides both models' logits. Default: 1.0.
        ignore_index (int): positions with this target cost nothing and output 0. Default: -100.
        return_logprobs (bool): also return the student's log-prob of ``targets`` at
            temperature 1 (the hard cross-entropy term's). Default: False.
        backend (str): as for the log-prob primitive (``fused_losses.BACKENDS``):
            ``"cublas"`` (cuBLAS GEMMs on chunks of both heads + fused Triton epilogues) or
            ``"triton"`` (fused kernels), each on CUDA or on the CPU under
            ``TRITON_INTERPRET=1``; ``"torch"`` (chunked PyTorch, any device); ``"auto"``:
            the library's CUDA default on CUDA, ``"torch"`` elsewhere. Default: "auto".
        chunk_size (int, optional): torch backend only: tokens per chunk. Default: sized so
            each of the chunk's two logit buffers takes about 64 MiB.

    Returns:
        DivergenceOutput: ``divergence`` and (if asked) ``logprobs``, shaped like
        ``targets``, differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` only.
    """
    impl, opts, tensors = _prepare(
        hidden, weight, teacher_hidden, teacher_weight, targets, bias, teacher_bias,
        divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size, with_logprobs=return_logprobs)
    with no_autocast(hidden.device):
        divergence_out, logprobs = LinearDivergenceFunction.apply(*tensors, impl, opts)
    return DivergenceOutput(divergence_out.view(targets.shape),
                            None if logprobs is None else logprobs.view(targets.shape))


def linear_divergence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    grad_in_forward: bool | None = None,
) -> tuple[torch.Tensor, DivergenceOutput]:
    """``Σ_i D_i − hard_weight·Σ_i logprobs_i`` over the scored positions, and the per-token terms.

    The summed distillation loss before any normalisation: divide it by the number of
    scored tokens (or ``num_items_in_batch``) for a token mean. With ``hard_weight`` ≠ 0 the
    second term is ``hard_weight`` × the student's summed cross-entropy on ``targets`` at
    temperature 1.

    Args:
        hard_weight (float): weight of the cross-entropy term. Default: 0.0.
        grad_in_forward (bool, optional): form the student's gradients in the forward pass:
            the torch and cuBLAS implementations then form each chunk's logits once (4 GEMMs
            instead of 6; for JSD's cuBLAS forward, instead of 8) and hold dW until
            backward, which may run once. ``None``: on when some student tensor needs a
            gradient and the backend has that one-pass path (torch, cublas), else
            ``linear_divergence`` with recompute in backward. Default: None.
        others: as in :func:`linear_divergence`.

    Returns:
        (Tensor, DivergenceOutput): the scalar sum (float32; float64 for float64 inputs),
        and the per-token ``divergence`` and ``logprobs`` (when ``hard_weight`` ≠ 0), detached
        on the gradient-in-forward path.
    """
    if isinstance(hard_weight, bool) or not isinstance(hard_weight, (int, float)) \
            or not math.isfinite(hard_weight):
        raise ValueError(f"hard_weight must be a finite number, got {hard_weight!r}")
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be None or a bool, got {grad_in_forward!r}")
    with_logprobs = hard_weight != 0
    impl, opts, tensors = _prepare(
        hidden, weight, teacher_hidden, teacher_weight, targets, bias, teacher_bias,
        divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size, with_logprobs=with_logprobs)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grad_in_forward is None:
        grad_in_forward = needs_grad and hasattr(impl, "forward_backward")
    with no_autocast(hidden.device):
        if grad_in_forward and needs_grad:
            loss, divergence_out, logprobs = DivergenceLossFunction.apply(*tensors, impl, opts,
                                                                          float(hard_weight))
        else:
            divergence_out, logprobs = LinearDivergenceFunction.apply(*tensors, impl, opts)
            loss = divergence_out.sum()
            if with_logprobs:
                loss = loss - hard_weight * logprobs.sum()
    return loss, DivergenceOutput(
        divergence_out.view(targets.shape),
        None if logprobs is None else logprobs.view(targets.shape))


__all__ = ["linear_divergence", "linear_divergence_loss", "DivergenceOutput", "DIVERGENCES"]
