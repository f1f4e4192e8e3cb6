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

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .backends import resolve_backend

Backend = str  # one of BACKENDS


class LogProbs(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs`, each shaped like ``targets``.

    ``logprobs``, ``lse``, ``entropy`` and ``logits_mean`` are float32 (float64 for float64
    inputs) and differentiable; ``argmax`` is int64. Ignored positions hold 0 (``argmax``: ``ignore_index``). Outputs not
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


def _is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_finite(name: str, value) -> None:
    """A real number in (0, inf); a bool is refused (True would be silently 1)."""
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a positive finite number, got {value!r} "
                        f"({type(value).__name__})")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_ignore_index(ignore_index) -> None:
    """The target id of unscored positions: an int (not a bool)."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r} "
                        f"({type(ignore_index).__name__})")


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
        if t.device.type == "meta":
            raise ValueError(f"{_describe(name, t)}: expected a tensor with data (cpu or "
                             "cuda); meta tensors have none to compute on")
    check_ignore_index(ignore_index)
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            f"weight is a DTensor shard (placements {weight.placements}), not the full [V, H] "
            "weight. Under FSDP/ZeRO-3 call the loss inside the module's forward (or "
            "register_fsdp_forward_method) so the weight is gathered; for a vocabulary-"
            "parallel (ColwiseParallel) head pass process_group= to use its shards directly")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{_describe(name, t)}: expected a floating dtype {_FLOATS}")
    # 16/32-bit inputs may mix (compute_dtype promotes them, as mixed precision does);
    # float64 is a reference precision and is not silently mixed in
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and (t.dtype == torch.float64) != (
                hidden.dtype == torch.float64):
            raise TypeError(f"{_describe(name, t)}: float64 mixes only with float64; hidden "
                            f"is {hidden.dtype}")
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
    if weight.shape[1] < 1:
        raise ValueError(f"{_describe('hidden', hidden)}: the hidden size H must be >= 1")
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
        if bias.dtype not in _FLOATS or bias.device != hidden.device:
            raise TypeError(f"{_describe('bias', bias)}: expected a floating dtype {_FLOATS} "
                            f"on {hidden.device}")
    check_positive_finite("temperature", temperature)
    if softcap is not None:
        check_positive_finite("softcap (None for no soft-capping)", softcap)
    if check_target_range and not torch.compiler.is_compiling():  # compiled: in the op
        check_target_ids(targets, weight.shape[0], ignore_index)


def check_target_ids(targets: torch.Tensor, vocab: int, ignore_index: int,
                     what: str = "") -> None:
    """Every id in [0, vocab) or ignore_index. On the CPU (no host sync to pay) a clear
    ValueError; on an accelerator a device-side assert, as ``F.cross_entropy`` does there:
    waiting for the answer would stall the host on every call."""
    if not targets.numel():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type != "cpu":
        torch._assert_async(~bad.any(), f"targets: ids outside {what}[0, {vocab}) that are "
                                        f"not ignore_index={ignore_index}")
    elif bool(bad.any()):
        raise ValueError(
            f"{_describe('targets', targets)}: {int(bad.sum())} id(s) outside {what}[0, "
            f"{vocab}) that are not ignore_index={ignore_index} "
            f"(first: {targets[bad][0].item()})")


def check_options(*, deterministic: bool = False, filter_eps=None, chunk_size=None) -> None:
    """The primitive's non-tensor options, shared by every fused entry point."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if filter_eps is not None and not (_is_real_number(filter_eps) and filter_eps >= 0):
        raise ValueError(f"filter_eps must be None or a number >= 0, got {filter_eps!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int)
                                       and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

def first_order_only(backward, name: str | None = None):
    """Make differentiating a Function's gradients (double backward: a gradient penalty
    through ``create_graph=True``) a clear error instead of a silent zero.

    ``torch.autograd.function.once_differentiable`` marks the gradients only when an upstream
    gradient requires grad; ours also depend on the saved hidden and weight, so with
    ``create_graph=True`` they are always marked, and any use of them in a backward raises.
    ``name``: what the message calls the Function (default: the backward's class).
    """
    name = name or backward.__qualname__.split(".")[0]
    message = (f"fused_losses: {name} has no double backward: "
               "its gradients cannot be differentiated again (create_graph=True followed by "
               "a penalty on a gradient). Compute such a penalty without the fused LM head.")

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # the usual first-order backward
            return grads
        marked = [None if g is None else g.detach().requires_grad_() for g in grads]
        error = torch._C._functions.DelayedError(message.encode(), len(marked))
        return error(*marked)
    return wrapper


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
        outputs, stats = forward_outputs(hidden, weight, bias, rows, targets, backend, opts)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, stats.lse, stats.entropy)
        ctx.backend, ctx.opts = backend, opts
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (outputs[2],) if t is not None))
        return outputs

    @staticmethod
    @first_order_only
    def backward(ctx, g_logprobs, g_lse, _g_argmax, g_entropy, g_logits_mean):
        hidden, weight, bias, rows, targets, lse, entropy = ctx.saved_tensors
        upstream = (g_logprobs, g_lse, g_entropy, g_logits_mean)
        return backward_grads(hidden, weight, bias, rows, targets, lse, entropy, upstream,
                              ctx.needs_input_grad[:3], ctx.backend, ctx.opts) + (None,) * 4


def forward_outputs(hidden, weight, bias, rows, targets, backend, opts: Options):
    """The backend's forward on the scored rows, scattered to hidden's M rows: (the five
    [M] outputs, the [N] statistics). Shared by the autograd Function and the custom op."""
    size = hidden.shape[0]
    stats = LogProbs(*backend.forward(hidden, weight, bias, rows, targets,
                                      **_forward_kwargs(opts)))
    outputs = (_scatter(stats.logprobs, rows, size), _scatter(stats.lse, rows, size),
               _scatter(stats.argmax, rows, size, fill=opts.ignore_index),
               _scatter(stats.entropy, rows, size), _scatter(stats.logits_mean, rows, size))
    return outputs, stats


def backward_grads(hidden, weight, bias, rows, targets, lse, entropy, upstream, needs,
                   backend, opts: Options):
    """(dH, dW, dBias) from the [M] upstream gradients (None where none flows); ``lse`` and
    ``entropy`` are the [N] statistics of the scored rows."""
    grads = Grads(*(None if g is None else g.index_select(0, rows).to(lse.dtype)
                    for g in upstream))
    if all(g is None for g in grads) or rows.numel() == 0:
        return _zero_grads(hidden, weight, bias, needs)
    need_hidden, need_weight, need_bias = needs
    with no_autocast(hidden.device):
        return tuple(backend.backward(
            hidden, weight, bias, rows, targets, lse, entropy, *grads,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            filter_eps=opts.filter_eps, **_backward_kwargs(opts)))


def _zero_grads(hidden, weight, bias, needs):
    return tuple(torch.zeros_like(t) if (t is not None and need) else None
                 for t, need in zip((hidden, weight, bias), needs[:3]))


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


# ---------------------------------------------------------------------------------------------
# torch.compile: the primitive as one opaque custom op (with fake impls and autograd)
# ---------------------------------------------------------------------------------------------
# Dynamo cannot trace the data-dependent parts (the scored-row compaction, the target-id
# check) nor the Triton launches, and inductor has nothing to fuse inside them, so under
# torch.compile the whole primitive is one custom op whose output shapes are static ([M]);
# everything around it (casts, shaping, the losses' own math) is compiled. Eager calls keep
# the autograd Function above: the same forward_outputs / backward_grads either way.

_OP_OPTIONS = "int ignore_index, float temperature, float? softcap, str backend, " \
              "float? filter_eps, int? chunk_size"


def _op_setup(hidden, targets, ignore_index, temperature, softcap, backend, filter_eps,
              chunk_size, **requested):
    backend_module = resolve_backend(backend, hidden.device)
    opts = make_options(backend_module, temperature=temperature, softcap=softcap,
                        filter_eps=filter_eps, chunk_size=chunk_size, ignore_index=ignore_index,
                        **requested)
    rows = (targets != ignore_index).nonzero().squeeze(-1)
    return backend_module, opts, rows, targets.index_select(0, rows).long()


@torch.library.custom_op("fused_losses::linear_logprobs", mutates_args=())
def _logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore_index: int, temperature: float,
                 softcap: float | None, backend: str, filter_eps: float | None,
                 chunk_size: int | None, return_argmax: bool, return_entropy: bool,
                 return_logits_mean: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """hidden [M, H] (compute dtype), targets [M] -> logprobs, lse, argmax, entropy,
    logits_mean [M] each; outputs not asked for are empty."""
    check_target_ids(targets, weight.shape[0], ignore_index)
    backend_module, opts, rows, scored = _op_setup(
        hidden, targets, ignore_index, temperature, softcap, backend, filter_eps, chunk_size,
        return_argmax=return_argmax, return_entropy=return_entropy,
        return_logits_mean=return_logits_mean)
    with no_autocast(hidden.device):
        outputs, _ = forward_outputs(hidden, weight, bias, rows, scored, backend_module, opts)
    logprobs, lse, argmax, entropy, logits_mean = outputs
    return (logprobs, lse, targets.new_empty(0, dtype=torch.int64) if argmax is None else argmax,
            lse.new_empty(0) if entropy is None else entropy,  # outputs may not alias
            lse.new_empty(0) if logits_mean is None else logits_mean)


@_logprobs_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, softcap, backend, filter_eps,
      chunk_size, return_argmax, return_entropy, return_logits_mean):
    stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    size = hidden.shape[0]

    def out(wanted, dtype=stat):
        return hidden.new_empty(size if wanted else 0, dtype=dtype)
    return (out(True), out(True), out(return_argmax, torch.int64), out(return_entropy),
            out(return_logits_mean))


@torch.library.custom_op("fused_losses::linear_logprobs_backward", mutates_args=())
def _logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
                          entropy: torch.Tensor, grad_logprobs: torch.Tensor | None,
                          grad_lse: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                          grad_logits_mean: torch.Tensor | None, need_hidden: bool,
                          need_weight: bool, need_bias: bool, ignore_index: int,
                          temperature: float, softcap: float | None, backend: str,
                          filter_eps: float | None, chunk_size: int | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dH [M, H], dW [V, H], dBias [V]) from the [M] outputs' gradients; empty where not
    needed."""
    backend_module, opts, rows, scored = _op_setup(
        hidden, targets, ignore_index, temperature, softcap, backend, filter_eps, chunk_size)
    upstream = tuple(None if g is None or g.numel() == 0 else g
                     for g in (grad_logprobs, grad_lse, grad_entropy, grad_logits_mean))
    stats = [t.index_select(0, rows) if t.numel() else None for t in (lse, entropy)]
    grads = backward_grads(hidden, weight, bias, rows, scored, *stats, upstream,
                           (need_hidden, need_weight, need_bias), backend_module, opts)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_logprobs_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_lse, grad_entropy,
      grad_logits_mean, need_hidden, need_weight, need_bias, *options):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None
            else hidden.new_empty(0))


def _op_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[3])
    ctx.options = options[:6]  # ignore_index .. chunk_size


def _op_backward(ctx, g_logprobs, g_lse, _g_argmax, g_entropy, g_logits_mean):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _logprobs_backward_op(hidden, weight, bias, targets, lse, entropy, g_logprobs,
                                  g_lse, g_entropy, g_logits_mean, *needs, *ctx.options)
    return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * 10


# Eagerly, or compiled by a backend without AOTAutograd (which refuses double backward by
# itself), the op's backward would otherwise fail on the backward op having no autograd.
_logprobs_op.register_autograd(
    first_order_only(_op_backward, "the custom op fused_losses::linear_logprobs"),
    setup_context=_op_setup_context)


def _compiled_logprobs(hidden, weight, targets, bias, *, ignore_index, temperature, softcap,
                       backend, filter_eps, chunk_size, return_argmax, return_entropy,
                       return_logits_mean):
    """The primitive through the custom op (under torch.compile): the five [M] outputs,
    None where not asked for. The checks that need data (target ids) run inside the op."""
    validate(hidden, weight, targets, bias, ignore_index=ignore_index,
             temperature=temperature, softcap=softcap)
    hidden, weight, bias = cast_to_compute_dtype(hidden, weight, bias)
    outputs = _logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                           targets.reshape(-1), ignore_index, float(temperature),
                           None if softcap is None else float(softcap), backend, filter_eps,
                           chunk_size, return_argmax, return_entropy, return_logits_mean)
    wanted = (True, True, return_argmax, return_entropy, return_logits_mean)
    return tuple(t if keep else None for t, keep in zip(outputs, wanted))


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
        first_node = leaves[1].view_as(leaves[1]).grad_fn._sequence_nr()
        loss = _scalar(loss_fn(LogProbs(*leaves), positions))
        wrt = [leaves[i] for i in (0, 1, 3, 4)]
        present = [t for t in wrt if t is not None]
        _check_closed_over_statistics(loss, present, first_node)
        found = iter(torch.autograd.grad(loss, present, allow_unused=True)) if loss.requires_grad \
            else iter([None] * len(present))
    return loss.detach(), Grads(*(None if t is None else next(found) for t in wrt))


def _scalar(loss):
    """``loss_fn``'s result, which must be a scalar (0-dim) tensor."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) \
            else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar (0-dim) tensor, got {got}")
    return loss


def _check_closed_over_statistics(loss: torch.Tensor, leaves: list, first_node: int) -> None:
    """Refuse a ``loss_fn`` whose result also depends on tensors that require a gradient
    (a learnable scale, a value head's output): only the statistics' gradients are formed in
    forward, so theirs would be silently dropped. Walks only the nodes ``loss_fn`` created
    (autograd numbers a thread's nodes in creation order); an older node or another leaf
    is such a tensor."""
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        foreign = (not any(variable is leaf for leaf in leaves)) if variable is not None \
            else node._sequence_nr() < first_node
        if foreign:
            raise ValueError(
                "loss_fn uses a tensor that requires a gradient besides the statistics it is "
                "given; linear_logprobs_loss forms only the statistics' gradients in forward, "
                "so that tensor's gradient would be lost. Detach it, or compute the loss from "
                "linear_logprobs (or pass grad_in_forward=False to the objective)")
        if variable is None:
            pending.extend(next_node for next_node, _ in node.next_functions)


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
    @first_order_only
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

def gradients_in_forward_available(backend: str, device: torch.device) -> bool:
    """Whether :func:`linear_logprobs_loss` can form gradients in its forward pass here: the
    backend has a one-pass ``forward_backward``, and torch.compile is not tracing (a Python
    loss over data-dependent chunks of scored rows is not traceable; the library's losses
    take the recompute path, one custom op, instead)."""
    if torch.compiler.is_compiling():
        return False
    return hasattr(resolve_backend(backend, device), "forward_backward")


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


def compute_dtype(hidden, weight, bias=None) -> torch.dtype:
    """The dtype the head runs in, as ``F.linear`` decides it: the autocast dtype when
    autocast is on for hidden's device (float64 inputs excepted, as autocast leaves them),
    else torch's type promotion of the inputs (a bf16 hidden with an fp32 head runs in fp32;
    an fp32 hidden with a 16-bit head upcasts the head, a [V, H] fp32 copy)."""
    dtypes = [t.dtype for t in (hidden, weight, bias) if t is not None]
    device_type = hidden.device.type
    if torch.float64 not in dtypes and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return functools.reduce(torch.promote_types, dtypes)


def cast_to_compute_dtype(hidden, weight, bias):
    """hidden, weight, bias in :func:`compute_dtype`: autograd casts (no copy when equal)."""
    dtype = compute_dtype(hidden, weight, bias)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def no_autocast(device: torch.device):
    """The backends compute in the dtype they are given: autocast must not recast inside."""
    return torch.autocast(device.type, enabled=False)


class Prepared(NamedTuple):
    """The inputs as every backend takes them: one compute dtype, flat rows."""

    backend: object  # the backend module
    hidden: torch.Tensor  # [M, H], compute dtype; differentiable back to the caller's dtype
    weight: torch.Tensor  # [V, H], compute dtype
    bias: torch.Tensor | None  # [V], compute dtype
    rows: torch.Tensor  # [N] int64, the scored rows of hidden
    targets: torch.Tensor  # [N] int64, their targets


def prepare(hidden, weight, targets, bias, *, ignore_index, temperature, softcap, backend,
            check_target_range=True) -> Prepared:
    """Validate, cast to the compute dtype, flatten to [M, H] and list the scored rows;
    shared by every fused entry point. The casts are autograd ops, so each input's gradient
    comes back in its own dtype (fp32 master weights keep fp32 gradients)."""
    validate(hidden, weight, targets, bias, ignore_index=ignore_index,
             temperature=temperature, softcap=softcap, check_target_range=check_target_range)
    backend_module = resolve_backend(backend, hidden.device)
    hidden, weight, bias = cast_to_compute_dtype(hidden, weight, bias)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    # Ignored rows are never visited: they cost no FLOPs and get zero gradient.
    rows = (flat_targets != ignore_index).nonzero().squeeze(-1)
    return Prepared(backend_module, hidden_2d, weight, bias, rows,
                    flat_targets.index_select(0, rows).long())


def next_token_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face labels ``[..., T]`` (aligned with the inputs) -> the primitive's aligned
    targets ``[..., T]`` int64: ``targets[..., t] = labels[..., t + 1]``, the last position
    ``ignore_index``, so the unshifted ``hidden[..., t, :]`` scores the next token. The one
    shifting rule of the library (``linear_cross_entropy(shift=True)``, the objectives,
    the TRL head); ``hidden`` is never copied."""
    return torch.nn.functional.pad(labels[..., 1:].long(), (0, 1), value=ignore_index)


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
    if torch.compiler.is_compiling():
        outputs = _compiled_logprobs(
            hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, backend=backend, filter_eps=filter_eps, chunk_size=chunk_size,
            return_argmax=return_argmax, return_entropy=return_entropy,
            return_logits_mean=return_logits_mean)
        return shape_outputs(outputs, targets.shape, return_lse=return_lse)
    inputs = prepare(hidden, weight, targets, bias, ignore_index=ignore_index,
                     temperature=temperature, softcap=softcap, backend=backend)
    opts = make_options(inputs.backend, temperature=temperature, softcap=softcap,
                        return_argmax=return_argmax, return_entropy=return_entropy,
                        return_logits_mean=return_logits_mean, filter_eps=filter_eps,
                        chunk_size=chunk_size, ignore_index=ignore_index)
    with no_autocast(hidden.device):
        outputs = LinearLogProbsFunction.apply(*inputs[1:], inputs.backend, opts)
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
            ``positions`` (a pair absent from the chunk contributes nothing, not f(0)). Only
            the statistics' gradients are formed, so a loss that also reads a tensor
            requiring a gradient (a learnable scale) is refused with a ``ValueError`` while
            hidden/weight/bias need one; use :func:`linear_logprobs` for such a loss.
        groups (LongTensor, optional): shaped like ``targets``; group id of each position.
            Default: None (every token is its own group).
        others: as in :func:`fused_losses.linear_logprobs`.

    Returns:
        Tensor: the scalar loss (float32; float64 for float64 inputs).
    """
    check_options(filter_eps=filter_eps, chunk_size=chunk_size)
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "linear_logprobs_loss cannot be traced by torch.compile (a Python loss_fn over "
            "data-dependent chunks of scored rows): compute the loss from linear_logprobs "
            "instead, as linear_cross_entropy and the objectives do while compiling")
    inputs = prepare(hidden, weight, targets, bias, ignore_index=ignore_index,
                     temperature=temperature, softcap=softcap, backend=backend)
    rows, boundaries = _group_rows(inputs.rows, groups, targets)
    flat_targets = targets.reshape(-1).index_select(0, rows).long()
    opts = make_options(inputs.backend, temperature=temperature, softcap=softcap,
                        return_argmax=return_argmax, return_entropy=return_entropy,
                        return_logits_mean=return_logits_mean, filter_eps=filter_eps,
                        chunk_size=chunk_size, ignore_index=ignore_index)
    tensors = (inputs.hidden, inputs.weight, inputs.bias, rows, flat_targets)
    with no_autocast(hidden.device):
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (hidden, weight, bias))):
            # No gradient wanted (no_grad, evaluation): the forward alone, one chunk of all
            # groups; loss_fn under the caller's grad mode (a learnable tensor in it still
            # gets its gradient).
            with torch.no_grad():
                stats = inputs.backend.forward(*tensors, **_forward_kwargs(opts))
            return _scalar(loss_fn(LogProbs(*stats), rows))
        return GradInForwardFunction.apply(*tensors, inputs.backend, opts, loss_fn,
                                           boundaries)
