"""The one primitive: per-token target log-probs of ``softmax(hidden @ weight.T + bias)``.

Everything in this library is a function of the per-token outputs computed here
(``logprobs``, ``lse``, ``argmax``, ``entropy``, ``logits_mean``). The ``[tokens x vocab]``
logits are never materialised: a backend walks them in tiles (Triton) or token chunks
(PyTorch), keeps O(tokens) statistics, and recomputes the tiles in backward.

Upstream gradients ``g = dL/dlogprobs``, ``h = dL/dlse``, ``e = dL/dentropy``,
``u = dL/dlogits_mean`` turn into the logit gradient (``objectives.md``, Notation)::

    dL/dz = p * (h - g - e * (z - mu)) + g * onehot(y) + u / V,   p = softmax(z), mu = sum_v p z

followed by the soft-cap chain rule ``1 - (z/s)^2`` and ``1/temperature``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .backends import BACKENDS, resolve_backend

Backend = str  # one of BACKENDS


class LogProbs(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs`, each shaped like ``targets``.

    ``logprobs``, ``lse``, ``entropy`` and ``logits_mean`` are float32 and differentiable;
    ``argmax`` is int64. Ignored positions hold 0 (``argmax``: ``ignore_index``). Outputs not
    asked for are ``None``.
    """

    logprobs: torch.Tensor
    lse: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logits_mean: torch.Tensor | None = None


class Grads(NamedTuple):
    """Per-token upstream gradients, [N] float32 each; ``None`` where no gradient flows."""

    logprobs: torch.Tensor | None
    lse: torch.Tensor | None
    entropy: torch.Tensor | None
    logits_mean: torch.Tensor | None


@dataclass(frozen=True)
class Options:
    """Everything the backends need besides tensors; one frozen object so autograd stays simple."""

    temperature: float = 1.0
    softcap: float | None = None
    with_argmax: bool = False
    with_entropy: bool = False
    with_logits_mean: bool = False
    filter_eps: float | None = None
    chunk_size: int | None = None  # torch backend: tokens per chunk; None = sized by memory
    ignore_index: int = -100  # the argmax of an ignored position

    def kernel_kwargs(self) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap)


# ---------------------------------------------------------------------------------------------
# Input checking: every error names the argument, what came and what was expected.
# ---------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    check_target_range: bool = True,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the bad argument; return quietly otherwise."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            f"weight is a DTensor shard (placements {weight.placements}), not the full [V, H] "
            "weight. Under FSDP/ZeRO-3 call the loss inside the module's forward (or "
            "register_fsdp_forward_method) so the weight is gathered; for a vocabulary-"
            "parallel (ColwiseParallel) head pass process_group= to use its shards directly")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"{_describe('hidden', hidden)}: expected a floating dtype {_FLOATS}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{_describe('weight', weight)}: expected the dtype of hidden ({hidden.dtype})")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_describe('targets', targets)}: expected integer token ids (int64)")
    if hidden.dim() < 1:
        raise ValueError(f"{_describe('hidden', hidden)}: expected shape [..., H]")
    if weight.dim() != 2:
        raise ValueError(f"{_describe('weight', weight)}: expected shape [V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{_describe('weight', weight)}: expected [V, {hidden.shape[-1]}] to match the "
            f"last dim of {_describe('hidden', hidden)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{_describe('weight', weight)}: the vocabulary V must be >= 1")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{_describe('targets', targets)}: expected shape {tuple(hidden.shape[:-1])}, the "
            f"leading shape of {_describe('hidden', hidden)} (targets are aligned, not shifted)")
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            raise ValueError(f"{_describe(name, t)}: expected device {hidden.device} (of hidden)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_describe('bias', bias)}: expected shape [{weight.shape[0]}] (V)")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(
                f"{_describe('bias', bias)}: expected dtype {hidden.dtype} on {hidden.device}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if check_target_range and targets.numel():
        vocab = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"{_describe('targets', targets)}: {int(bad.sum())} id(s) outside [0, {vocab}) "
                f"that are not ignore_index={ignore_index} (first: {first})")


def check_options(*, deterministic: bool = False, filter_eps=None, chunk_size=None) -> None:
    """The primitive's non-tensor options, shared by every fused entry point."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if filter_eps is not None and not filter_eps >= 0:
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

def _scatter(values: torch.Tensor | None, rows: torch.Tensor, size: int, fill=0):
    if values is None:
        return None
    out = torch.full((size,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


class LinearLogProbsFunction(torch.autograd.Function):
    """Forward: per-token statistics of the scored rows. Backward: recompute tiles.

    Saves only the inputs and [N]-sized statistics: nothing ``tokens x vocab`` and no
    ``[V, H]`` gradient survives from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, backend, opts: Options):
        # hidden [M, H] (all rows); rows [N] int64, the scored rows; targets [N]
        size = hidden.shape[0]
        stats = LogProbs(*backend.forward(hidden, weight, bias, rows, targets,
                                          **_forward_kwargs(opts)))
        ctx.save_for_backward(hidden, weight, bias, rows, targets, stats.lse, stats.entropy)
        ctx.backend, ctx.opts = backend, opts
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (stats.argmax,) if t is not None))
        return (
            _scatter(stats.logprobs, rows, size),
            _scatter(stats.lse, rows, size),
            _scatter(stats.argmax, rows, size, fill=opts.ignore_index),
            _scatter(stats.entropy, rows, size),
            _scatter(stats.logits_mean, rows, size),
        )

    @staticmethod
    def backward(ctx, g_logprobs, g_lse, _g_argmax, g_entropy, g_logits_mean):
        hidden, weight, bias, rows, targets, lse, entropy = ctx.saved_tensors
        grads = Grads(*(None if g is None else g.index_select(0, rows).to(lse.dtype)
                        for g in (g_logprobs, g_lse, g_entropy, g_logits_mean)))
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if all(g is None for g in grads) or rows.numel() == 0:
            return _zero_grads(hidden, weight, bias, ctx.needs_input_grad)
        grad_hidden, grad_weight, grad_bias = ctx.backend.backward(
            hidden, weight, bias, rows, targets, lse, entropy, *grads,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            filter_eps=ctx.opts.filter_eps, **_backward_kwargs(ctx.opts))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _zero_grads(hidden, weight, bias, needs):
    return tuple(torch.zeros_like(t) if (t is not None and need) else None
                 for t, need in zip((hidden, weight, bias), needs[:3])) + (None,) * 4


def _forward_kwargs(opts: Options) -> dict:
    kwargs = dict(opts.kernel_kwargs(), with_argmax=opts.with_argmax,
                  with_entropy=opts.with_entropy, with_logits_mean=opts.with_logits_mean)
    if opts.chunk_size is not None:
        kwargs["chunk_size"] = opts.chunk_size
    return kwargs


def _backward_kwargs(opts: Options) -> dict:
    kwargs = opts.kernel_kwargs()
    if opts.chunk_size is not None:
        kwargs["chunk_size"] = opts.chunk_size
    return kwargs


# A loss whose gradient is formed in the forward pass: ``loss_fn(stats, positions)`` gets the
# per-token statistics of one chunk of scored rows and their flat positions in ``targets``
# and returns that chunk's (already normalised) scalar loss; the total is the sum over
# chunks. So every normaliser must be known before the pass, and a chunk must hold whole
# groups (a token, a sequence, a preference pair) of rows. The upstream gradients come from
# autograd on the [n]-sized statistics, so a loss is written once, as plain math.
ChunkLoss = Callable[[LogProbs, torch.Tensor], torch.Tensor]


def _loss_and_grads(loss_fn: ChunkLoss, stats: tuple, positions: torch.Tensor):
    with torch.enable_grad():
        leaves = [s if s is None or not s.is_floating_point() else s.detach().requires_grad_()
                  for s in stats]
        loss = loss_fn(LogProbs(*leaves), positions)
        wrt = [leaves[i] for i in (0, 1, 3, 4)]
        present = [t for t in wrt if t is not None]
        found = iter(torch.autograd.grad(loss, present, allow_unused=True)) if loss.requires_grad \
            else iter([None] * len(present))
    return loss.detach(), Grads(*(None if t is None else next(found) for t in wrt))


# The one-pass path holds one whole group's fp32 logits at a time, so it runs only where a
# group fits in the backend's budget (ONE_PASS_BYTES); beyond it (long sequences, pairs) the
# gradients are formed by forward, loss, then backward: 4 matmuls, no group-sized buffer.
# Measured for DPO at 2 pairs x 512 tokens, V=32000 (98 MB per pair): one pass 0.77x Liger's
# time at 0.32x naive's memory; recompute about Liger's time at 0.23x (benchmarks/notes.md, D2).
def _group_fits_one_pass(backend, boundaries, vocab: int) -> bool:
    if not boundaries:
        return True
    largest = max(b - a for a, b in zip([0, *boundaries[:-1]], boundaries))
    return largest * vocab * 4 <= backend.ONE_PASS_BYTES


class GradInForwardFunction(torch.autograd.Function):
    """A loss over chunks of whole groups whose input gradients are formed in forward.

    On a backend with a one-pass ``forward_backward`` (the torch backend) each chunk's logits
    are formed once for the loss and its gradients: 3 matmuls instead of 4. The price: dW
    ([V, H]) is held from forward to backward. Backward only scales by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, backend, opts: Options,
                loss_fn: ChunkLoss, boundaries):
        needs = dict(need_hidden=hidden.requires_grad, need_weight=weight.requires_grad,
                     need_bias=bias is not None and bias.requires_grad)
        head = lambda stats, piece: _loss_and_grads(loss_fn, stats, rows[piece])  # noqa: E731
        one_pass = getattr(backend, "forward_backward", None)
        if one_pass is not None and _group_fits_one_pass(backend, boundaries, weight.shape[0]):
            loss, *input_grads = one_pass(hidden, weight, bias, rows, targets, head,
                                          boundaries=boundaries, filter_eps=opts.filter_eps,
                                          **needs, **_forward_kwargs(opts))
        else:  # forward, then the backward kernels with the loss's gradients
            stats = backend.forward(hidden, weight, bias, rows, targets, **_forward_kwargs(opts))
            loss, grads = head(stats, slice(None))
            input_grads = backend.backward(hidden, weight, bias, rows, targets, stats[1],
                                           stats[3], *grads, filter_eps=opts.filter_eps,
                                           **needs, **_backward_kwargs(opts))
        # Stashed on ctx, not saved for backward: they are outputs of this Function's own
        # work and are scaled in place (a copy would double the gradients' memory).
        ctx.input_grads = input_grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.input_grads is None:
            raise RuntimeError("a loss whose gradients were formed in forward can be "
                               "backpropagated once; use grad_in_forward=False to "
                               "backpropagate through it more than once")
        grads, ctx.input_grads = ctx.input_grads, None
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return scaled + (None,) * 6


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def make_options(backend_module, *, temperature, softcap, return_argmax=False,
                 return_entropy=False, return_logits_mean=False, filter_eps=None,
                 chunk_size=None, ignore_index=-100) -> Options:
    if chunk_size is not None and "chunk_size" not in backend_module.OPTIONS:
        raise ValueError(
            f"chunk_size={chunk_size} (tokens per chunk) is an option of backend='torch'; "
            f"backend={backend_module.NAME!r} tiles by itself and does not take it. Pass "
            "backend='torch' or drop chunk_size")
    return Options(temperature=float(temperature),
                   softcap=None if softcap is None else float(softcap),
                   with_argmax=return_argmax, with_entropy=return_entropy,
                   with_logits_mean=return_logits_mean, filter_eps=filter_eps,
                   chunk_size=chunk_size, ignore_index=ignore_index)


def shape_outputs(outputs: tuple, shape, *, return_lse: bool) -> LogProbs:
    """The Function's flat [M] outputs as a LogProbs shaped like ``targets``; the lse is
    always computed (logprobs need it) but returned only when asked."""
    logprobs, lse, *rest = (None if t is None else t.view(shape) for t in outputs)
    return LogProbs(logprobs, lse if return_lse else None, *rest)


def prepare(hidden, weight, targets, bias, *, ignore_index, temperature, softcap, backend,
            check_target_range=True):
    """Validate, flatten to [M, H] and list the scored rows; shared by every fused entry point."""
    validate(hidden, weight, targets, bias, ignore_index=ignore_index,
             temperature=temperature, softcap=softcap, check_target_range=check_target_range)
    backend_module = resolve_backend(backend, hidden.device)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    # Ignored rows are never visited: they cost no FLOPs and get zero gradient.
    rows = (flat_targets != ignore_index).nonzero().squeeze(-1)
    return backend_module, hidden_2d, rows, flat_targets.index_select(0, rows).long()


def _group_rows(rows: torch.Tensor, groups: torch.Tensor | None, targets: torch.Tensor):
    """Order the scored rows group by group; return them with the groups' end offsets."""
    if groups is None:
        return rows, None
    if not isinstance(groups, torch.Tensor) or groups.shape != targets.shape \
            or groups.is_floating_point():
        raise ValueError(f"groups must be an integer tensor shaped like targets "
                         f"{tuple(targets.shape)}, got {getattr(groups, 'shape', groups)!r}")
    group_of_row = groups.reshape(-1).index_select(0, rows)
    order = torch.sort(group_of_row, stable=True).indices
    counts = torch.unique_consecutive(group_of_row[order], return_counts=True)[1]
    return rows[order], counts.cumsum(0).tolist()


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_argmax: bool = False,
    return_entropy: bool = False,
    return_logits_mean: bool = False,
    backend: Backend = "auto",
    deterministic: bool = False,
    filter_eps: float | None = None,
    chunk_size: int | None = None,
) -> LogProbs:
    """The single-device primitive: :func:`fused_losses.linear_logprobs` without the
    vocabulary-parallel options (arguments and returns as documented there)."""
    check_options(deterministic=deterministic, filter_eps=filter_eps, chunk_size=chunk_size)
    backend_module, hidden_2d, rows, flat_targets = prepare(
        hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, backend=backend)
    opts = make_options(backend_module, temperature=temperature, softcap=softcap,
                        return_argmax=return_argmax, return_entropy=return_entropy,
                        return_logits_mean=return_logits_mean, filter_eps=filter_eps,
                        chunk_size=chunk_size, ignore_index=ignore_index)
    outputs = LinearLogProbsFunction.apply(hidden_2d, weight, bias, rows, flat_targets,
                                           backend_module, opts)
    return shape_outputs(outputs, targets.shape, return_lse=return_lse)


def linear_logprobs_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: ChunkLoss,
    bias: torch.Tensor | None = None,
    *,
    groups: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_argmax: bool = False,
    return_entropy: bool = False,
    return_logits_mean: bool = False,
    backend: Backend = "auto",
    filter_eps: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A scalar loss of the primitive's per-token outputs, with gradients formed in forward.

    ``loss = sum over chunks of loss_fn(stats, positions)``, where ``stats`` is a
    :class:`LogProbs` of one chunk's scored rows ([n] each; ``lse`` always, the others as
    requested) and ``positions`` [n] are those rows' flat indices into ``targets``. On the
    torch backend each chunk's logits are formed once for the loss and its gradient (3
    matmuls instead of the 4 of ``linear_logprobs`` + autograd); dW is held until backward.

    Valid when the loss is additive over ``groups`` and every normaliser is known before the
    pass: a chunk always holds whole groups (positions with equal ``groups`` values), so a
    per-sequence or per-pair non-linearity (DPO's log-sigmoid) sees all of its tokens. A
    group larger than the chunk budget becomes one (larger) chunk.

    Args:
        loss_fn (callable): ``(LogProbs, LongTensor [n]) -> scalar``; plain differentiable
            torch math on [n]-sized tensors. It must count only the groups present in
            ``positions`` (a pair absent from the chunk contributes nothing, not f(0)).
        groups (LongTensor, optional): shaped like ``targets``; group id of each position.
            Default: None (every token is its own group).
        others: as in :func:`fused_losses.linear_logprobs`.

    Returns:
        Tensor: the scalar loss (float32; float64 for float64 inputs).
    """
    check_options(filter_eps=filter_eps, chunk_size=chunk_size)
    backend_module, hidden_2d, rows, _ = prepare(
        hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, backend=backend)
    rows, boundaries = _group_rows(rows, groups, targets)
    flat_targets = targets.reshape(-1).index_select(0, rows).long()
    opts = make_options(backend_module, temperature=temperature, softcap=softcap,
                        return_argmax=return_argmax, return_entropy=return_entropy,
                        return_logits_mean=return_logits_mean, filter_eps=filter_eps,
                        chunk_size=chunk_size, ignore_index=ignore_index)
    return GradInForwardFunction.apply(hidden_2d, weight, bias, rows, flat_targets,
                                       backend_module, opts, loss_fn, boundaries)
