"""Vocabulary parallelism, the layer above the primitive, and the public ``linear_logprobs``.

:func:`linear_logprobs` (exported as ``fused_losses.linear_logprobs``) is the primitive of
:mod:`fused_losses.primitive` on one device, or :func:`vocab_parallel_logprobs` when
``process_group`` or ``vocab_start`` is given. The primitive never imports this module.

The LM head sharded by vocab rows:

Each rank of ``process_group`` holds ``weight_shard [V_r, H]`` covering the global ids
``[vocab_start, vocab_start + V_r)`` (a Megatron ``VocabParallelEmbedding``-style head or a
PyTorch ``ColwiseParallel`` ``lm_head``, whose weight is a DTensor sharded on dim 0). Every
rank sees the same ``hidden`` and the same global ``targets``. The local backend (the same
``forward``/``backward`` the single-device primitive uses, unchanged) runs on the shard, and a
few all-reduces of ``[N]``-sized vectors combine the per-rank statistics into the exact global
ones; the ``[tokens x vocab]`` logits are never formed and never communicated::

    m      = max_r lse_r                                   (all-reduce MAX)
    s_r    = exp(lse_r - m),  S = sum_r s_r                (all-reduce SUM)
    lse    = m + log S
    logp   = z_y - lse, z_y from the rank that owns y      (same SUM)
    H      = sum_r p_r (H_r - log p_r),  p_r = s_r / S     (same SUM; no large-logit cancellation)
    mean   = sum_r V_r mean_r / V                          (same SUM)
    argmax = global id of the largest logit, ties to the smallest id (MAX, then MIN)

Backward calls the local backend with the *global* ``lse`` and entropy, so its ``p`` is the
global softmax restricted to the shard, and all-reduces dH (every rank contributes the
``dz @ W_r`` of its slice). ``logp = z_y - lse`` has gradient ``onehot(y) - p``: ranks that do
not own ``y`` still get the ``-p`` part, which is passed to the backend as ``-g`` added to the
lse gradient. dW and dBias stay local shards.

Communication per call: forward 2 all-reduces of ``[N]`` floats (3 with argmax, plus one of
``[N]`` ids), one all-gather of 2 ints per rank (shard layout check); backward one all-reduce
of dH ``[M, H]`` — O(tokens), never O(tokens x vocab).

Collective consistency: every rank must make the same call (same ``hidden``, ``targets``,
options and requested outputs), and the same outputs must carry gradients on every rank
(they do when every rank computes the same loss), since backward decides from them whether
to all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import primitive
from .primitive import Backend, Grads, LogProbs, Options

__all__ = ["linear_logprobs", "vocab_parallel_logprobs", "VocabParallelLogProbsFunction",
           "VocabShard", "resolve_shard", "routes_here"]


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's weight rows sit in the global vocabulary."""

    group: object  # a torch.distributed ProcessGroup (None = the default group)
    start: int  # global id of local row 0
    size: int  # V_r, local rows
    vocab: int  # V, global rows (sum of V_r over the group)


# ---------------------------------------------------------------------------------------------
# Shard layout: plain tensors + (process_group, vocab_start), or a DTensor weight
# ---------------------------------------------------------------------------------------------

def _is_dtensor(t) -> bool:
    if t is None or not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def routes_here(process_group=None, vocab_start=None) -> bool:
    """Whether a ``linear_logprobs`` call belongs to :func:`vocab_parallel_logprobs`: only
    when ``process_group`` or ``vocab_start`` is given. A DTensor weight alone is not enough:
    an FSDP2 shard is also ``Shard(0)``, but its ranks hold different tokens, so reducing
    over them would be silently wrong (``linear_logprobs`` refuses it with advice instead)."""
    return process_group is not None or vocab_start is not None


def _dtensor_shard(weight):
    """(local weight, group, vocab_start) of a DTensor sharded on dim 0 along one mesh dim.

    Other mesh dims must be ``Replicate`` (e.g. the weight FSDP2 has already all-gathered
    over the data-parallel dim of a 2-D mesh before the forward).
    """
    mesh, placements = weight.device_mesh, weight.placements
    vocab_dims = [i for i, p in enumerate(placements) if p.is_shard(0)]
    others_ok = all(p.is_replicate() for i, p in enumerate(placements) if i not in vocab_dims)
    if len(vocab_dims) != 1 or not others_ok:
        raise ValueError(
            f"weight: a DTensor with placements {placements} on mesh {mesh}; expected Shard(0) "
            "on exactly one mesh dim and Replicate on the others (ColwiseParallel lm_head)")
    mesh_dim = vocab_dims[0]
    local = weight.to_local()
    n, coord = mesh.size(mesh_dim), mesh.get_coordinate()[mesh_dim]
    vocab = weight.shape[0]
    # DTensor's Shard(0) splits like torch.chunk: ceil(V / n) rows per rank, the tail short.
    per_rank = -(-vocab // n)
    start = min(coord * per_rank, vocab)
    if local.shape[0] != min(per_rank, vocab - start):
        raise ValueError(f"weight: DTensor local shard has {local.shape[0]} rows; expected "
                         f"{min(per_rank, vocab - start)} (Shard(0) of {vocab} over {n} ranks)")
    return local, mesh.get_group(mesh_dim), start


def _local_tensor(t, name: str):
    """A Replicate or Shard(0) DTensor's local tensor (differentiable); plain tensors as is."""
    if not _is_dtensor(t):
        return t
    if name == "hidden" and not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"hidden: a DTensor with placements {t.placements}; vocab parallelism "
                         "needs the full hidden states on every rank (Replicate)")
    return t.to_local()


def resolve_shard(weight, process_group=None, vocab_start: int | None = None):
    """(local weight, :class:`VocabShard`) from a DTensor or a plain shard.

    A plain shard without ``vocab_start`` is placed by rank order: rank r starts after the
    rows of ranks 0..r-1. One all-gather of ``(start, V_r)`` checks that the shards tile
    ``[0, V)`` exactly (no gap, no overlap) and gives ``V``.
    """
    if _is_dtensor(weight):
        local, group, start = _dtensor_shard(weight)
        if process_group is not None and process_group is not group:
            raise ValueError("process_group: a DTensor weight brings its own group (its "
                             "mesh's vocab dim); pass process_group=None or that group")
        if vocab_start is not None and vocab_start != start:
            raise ValueError(f"vocab_start={vocab_start}, but the DTensor weight's shard "
                             f"starts at {start}")
    else:
        local, group, start = weight, process_group, vocab_start
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab-parallel log-probs need torch.distributed to be initialised "
                           "(dist.init_process_group) before the call")
    if not isinstance(local, torch.Tensor) or local.dim() != 2:
        raise ValueError(f"weight: expected a [V_r, H] tensor shard, got {type(local).__name__}"
                         f" of shape {getattr(local, 'shape', None)}")
    size = int(local.shape[0])
    if size < 1:
        raise ValueError("weight: this rank's vocab shard is empty (V < ranks?); every rank "
                         "must hold >= 1 vocabulary row")
    world = dist.get_world_size(group)
    layout = torch.tensor([-1 if start is None else int(start), size], dtype=torch.int64,
                          device=local.device)
    gathered = [torch.empty_like(layout) for _ in range(world)]
    dist.all_gather(gathered, layout, group=group)
    table = torch.stack(gathered).tolist()
    given = [s for s, _ in table]
    if start is None or min(given) < 0:
        if max(given) >= 0:
            raise ValueError("vocab_start: given on some ranks and not on others")
        offsets, acc = [], 0
        for _, n in table:
            offsets.append(acc)
            acc += n
        start = offsets[dist.get_rank(group)]
        table = [[o, n] for o, (_, n) in zip(offsets, table)]
    vocab = sum(n for _, n in table)
    covered = sorted((s, s + n) for s, n in table)
    edge = 0
    for lo, hi in covered:
        if lo != edge:
            raise ValueError(f"vocab_start: the shards (start, rows) = {table} do not tile "
                             f"[0, {vocab}) contiguously (gap or overlap at {min(lo, edge)})")
        edge = hi
    return local, VocabShard(group=group, start=int(start), size=size, vocab=vocab)


# ---------------------------------------------------------------------------------------------
# Combining per-rank statistics
# ---------------------------------------------------------------------------------------------

def _target_logits_at(hidden, weight, bias, rows, ids, opts: Options, acc_dtype):
    """Tempered, soft-capped logit ``z[row, id]`` per scored row, O(N*H), in chunks."""
    out = []
    for lo in range(0, rows.numel(), 4096):
        r, i = rows[lo:lo + 4096], ids[lo:lo + 4096]
        z = torch.linalg.vecdot(hidden.index_select(0, r).to(acc_dtype),
                                weight.index_select(0, i).to(acc_dtype))
        if bias is not None:
            z = z + bias.index_select(0, i).to(acc_dtype)
        out.append(z)
    z = torch.cat(out) if out else hidden.new_zeros(0, dtype=acc_dtype)
    if opts.temperature != 1.0:
        z = z * (1.0 / opts.temperature)
    if opts.softcap is not None:
        z = torch.tanh(z / opts.softcap) * opts.softcap
    return z


def _combine(local: LogProbs, owned, hidden, weight, bias, rows, opts: Options,
             shard: VocabShard) -> LogProbs:
    """Exact global [N] statistics from this rank's local ones (2-3 small all-reduces)."""
    group, lse_r = shard.group, local.lse
    maxes = [lse_r]
    if opts.with_argmax:
        best = _target_logits_at(hidden, weight, bias, rows, local.argmax, opts, lse_r.dtype)
        maxes.append(best)
    maxed = torch.stack(maxes)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    m = maxed[0]
    s_r = torch.exp(lse_r - m)
    sums = [s_r, torch.where(owned, local.logprobs + (lse_r - m), 0.0)]
    if opts.with_entropy:
        sums.append(s_r * (local.entropy - (lse_r - m)))
    if opts.with_logits_mean:
        sums.append(local.logits_mean * (shard.size / shard.vocab))
    summed = torch.stack(sums)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    total = summed[0]
    log_total = total.log()
    lse = m + log_total
    logprobs = summed[1] - log_total
    entropy = summed[2] / total + log_total if opts.with_entropy else None
    logits_mean = summed[-1] if opts.with_logits_mean else None
    argmax = None
    if opts.with_argmax:
        winner = torch.where(best == maxed[1], local.argmax + shard.start, shard.vocab)
        dist.all_reduce(winner, op=dist.ReduceOp.MIN, group=group)
        argmax = winner
    return LogProbs(logprobs, lse, argmax, entropy, logits_mean)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class VocabParallelLogProbsFunction(torch.autograd.Function):
    """:class:`~fused_losses.primitive.LinearLogProbsFunction` over a vocab shard.

    Same arguments plus ``shard``; same five outputs (global values, argmax a global id),
    scattered to ``hidden``'s M rows. Saves the inputs and [N]-sized statistics only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, backend, opts: Options,
                shard: VocabShard):
        # hidden [M, H] (same on every rank); weight [V_r, H]; rows [N]; targets [N] global ids
        size = hidden.shape[0]
        owned = (targets >= shard.start) & (targets < shard.start + shard.size)
        # Rows whose target lives elsewhere read local id 0; their local logprob is discarded.
        local_targets = torch.where(owned, targets - shard.start, 0)
        local = LogProbs(*backend.forward(hidden, weight, bias, rows, local_targets,
                                          **primitive._forward_kwargs(opts)))
        stats = _combine(local, owned, hidden, weight, bias, rows, opts, shard)
        ctx.save_for_backward(hidden, weight, bias, rows, local_targets, owned, stats.lse,
                              stats.entropy)
        ctx.backend, ctx.opts, ctx.shard = backend, opts, shard
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (stats.argmax,) if t is not None))
        scatter = primitive._scatter
        return (scatter(stats.logprobs, rows, size), scatter(stats.lse, rows, size),
                scatter(stats.argmax, rows, size, fill=opts.ignore_index),
                scatter(stats.entropy, rows, size), scatter(stats.logits_mean, rows, size))

    @staticmethod
    @primitive.first_order_only
    def backward(ctx, g_logprobs, g_lse, _g_argmax, g_entropy, g_logits_mean):
        hidden, weight, bias, rows, local_targets, owned, lse, entropy = ctx.saved_tensors
        shard = ctx.shard
        g = Grads(*(None if t is None else t.index_select(0, rows).to(lse.dtype)
                    for t in (g_logprobs, g_lse, g_entropy, g_logits_mean)))
        if all(t is None for t in g) or rows.numel() == 0:
            return primitive._zero_grads(hidden, weight, bias, ctx.needs_input_grad) \
                + (None,) * 5
        grad_logprobs, grad_lse = g.logprobs, g.lse
        if grad_logprobs is not None:
            # d logp / dz = onehot(y) - p: the onehot only where y is owned, -p everywhere,
            # and the backend's p-coefficient is (g_lse - g_logprobs).
            not_owned = torch.where(owned, 0.0, grad_logprobs)
            grad_lse = -not_owned if grad_lse is None else grad_lse - not_owned
            grad_logprobs = grad_logprobs - not_owned
        grad_mean = g.logits_mean
        if grad_mean is not None:  # the backend divides by its local V_r; the mean is over V
            grad_mean = grad_mean * (shard.size / shard.vocab)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with primitive.no_autocast(hidden.device):
            grad_hidden, grad_weight, grad_bias = ctx.backend.backward(
                hidden, weight, bias, rows, local_targets, lse, entropy, grad_logprobs,
                grad_lse, g.entropy, grad_mean, need_hidden=need_hidden,
                need_weight=need_weight, need_bias=need_bias, filter_eps=ctx.opts.filter_eps,
                **primitive._backward_kwargs(ctx.opts))
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    process_group=None,
    vocab_start: int | None = None,
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
    """:func:`~fused_losses.linear_logprobs` with the vocabulary sharded over ``process_group``.

    Every output is the exact global value (up to fp rounding), as if the full ``[V, H]``
    weight were on one device: ``logprobs``/``lse``/``entropy``/``logits_mean`` over all V
    columns and ``argmax`` a global id (ties to the smallest id). Gradients: ``hidden`` gets
    the full (all-reduced) dH on every rank; ``weight``/``bias`` get this rank's shard rows.

    Args:
        hidden (Tensor): [..., H], identical on every rank (or a Replicate DTensor).
        weight (Tensor): this rank's rows ``[V_r, H]``, or a DTensor sharded ``Shard(0)`` on
            one mesh dim (``ColwiseParallel`` ``lm_head.weight``; group and offset are read
            from its mesh, and its gradient arrives as a DTensor of the same placement).
        targets (LongTensor): [...] global ids in [0, V) or ``ignore_index``; same on all ranks.
        bias (Tensor, optional): this rank's [V_r] (plain or DTensor). Default: None.
        process_group (ProcessGroup, optional): the ranks sharing the vocabulary.
            Default: None (the default group; a DTensor weight uses its mesh's group).
        vocab_start (int, optional): global id of this rank's first row. Default: None, placed
            by rank order (rank r after ranks 0..r-1), or read from a DTensor.
        others: as in :func:`fused_losses.linear_logprobs`.

    Returns:
        LogProbs: as :func:`fused_losses.linear_logprobs`, identical on every rank.
    """
    primitive.check_options(deterministic=deterministic, filter_eps=filter_eps,
                            chunk_size=chunk_size)
    hidden, bias = _local_tensor(hidden, "hidden"), _local_tensor(bias, "bias")
    targets = _local_tensor(targets, "targets")
    weight, shard = resolve_shard(weight, process_group, vocab_start)
    inputs = primitive.prepare(hidden, weight, targets, bias, ignore_index=ignore_index,
                               temperature=temperature, softcap=softcap, backend=backend,
                               check_target_range=False)
    # ids are global here: checked against the whole vocabulary
    primitive.check_target_ids(targets, shard.vocab, ignore_index, "the global vocabulary ")
    opts = primitive.make_options(
        inputs.backend, temperature=temperature, softcap=softcap, return_argmax=return_argmax,
        return_entropy=return_entropy, return_logits_mean=return_logits_mean,
        filter_eps=filter_eps, chunk_size=chunk_size, ignore_index=ignore_index)
    with primitive.no_autocast(inputs.hidden.device):
        outputs = VocabParallelLogProbsFunction.apply(*inputs[1:], inputs.backend, opts, shard)
    return primitive.shape_outputs(outputs, targets.shape, return_lse=return_lse)


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
    process_group=None,
    vocab_start: int | None = None,
) -> LogProbs:
    """Log-probs of ``targets`` under ``softmax(logits)``; the ``[N, V]`` logits are never formed.

    ``logits = (hidden @ weight.T + bias) / temperature``, then ``softcap·tanh(logits/softcap)``
    if ``softcap`` is set. ``targets[i]`` is predicted from ``hidden[i]`` (no shift).

    Args:
        hidden (Tensor): [..., H]; float32, bfloat16, float16 (or float64, torch backend).
        weight (Tensor): [V, H] of any layout (``P.T`` of a ``[H, V]`` table, a slice), on
            hidden's device. The head runs in the dtype ``F.linear`` would use: the autocast
            dtype under ``torch.autocast``, else the promotion of the inputs' dtypes (a bf16
            ``hidden`` with an fp32 head runs in fp32); each input's gradient comes back in
            its own dtype. Logits and statistics are fp32 whatever that dtype.
        targets (LongTensor): [...] (the leading shape of ``hidden``); ids in [0, V) or
            ``ignore_index``.
        bias (Tensor, optional): [V]. Default: None.
        ignore_index (int): positions with this target cost no FLOPs, output 0 and get zero
            gradient. Default: -100.
        temperature (float): > 0; logits are divided by it. Default: 1.0.
        softcap (float, optional): > 0; Gemma-2 style ``softcap·tanh(z/softcap)``. Default: None.
        return_lse (bool): also return the log-sum-exp of the logits. Default: False.
        return_argmax (bool): also return the greedy token (int64). Default: False.
        return_entropy (bool): also return the entropy of ``softmax(logits)``. Default: False.
        return_logits_mean (bool): also return the mean logit over the vocabulary (used by
            label smoothing and the ``logits/chosen`` metric). Default: False.
        backend (str): ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
            (chunked PyTorch, any device) or ``"auto"`` (Triton on CUDA when it imports, else
            torch). Default: "auto".
        deterministic (bool): request bitwise-identical results run to run. Every current
            kernel and the torch backend are deterministic (no atomics: each program owns the
            rows of the gradient it writes), so this is a guarantee, not a slower mode.
            Default: False.
        filter_eps (float, optional): skip backward tiles whose logit gradient is below this
            in magnitude (Cut Cross-Entropy's gradient filtering). Changes the gradient,
            most where the distribution is flat (see README); exact when None. Default: None.
        chunk_size (int, optional): torch backend only: tokens per chunk. Default: sized so a
            chunk's fp32 logits take about 64 MiB.
        process_group (ProcessGroup, optional), vocab_start (int, optional): vocabulary
            parallelism. When either is given, ``weight`` (and ``bias``) hold this rank's rows
            ``[start, start + V_r)`` of the vocabulary (plain tensors, or a ``Shard(0)`` DTensor
            from a ``ColwiseParallel`` LM head), ``targets`` are global ids, and every output
            is the exact global value; communication is O(tokens). See
            :func:`fused_losses.vocab_parallel.vocab_parallel_logprobs`. Default: None.

    Returns:
        LogProbs: ``logprobs`` [...] float32 (0 where ignored), and ``lse`` / ``argmax`` /
        ``entropy`` / ``logits_mean`` shaped like ``targets`` or None when not asked.
        Backward accepts any combination of upstream gradients for the float outputs.
    """
    options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                   return_lse=return_lse, return_argmax=return_argmax,
                   return_entropy=return_entropy, return_logits_mean=return_logits_mean,
                   backend=backend, deterministic=deterministic, filter_eps=filter_eps,
                   chunk_size=chunk_size)
    if routes_here(process_group, vocab_start):
        return vocab_parallel_logprobs(hidden, weight, targets, bias, process_group=process_group,
                                       vocab_start=vocab_start, **options)
    return primitive.linear_logprobs(hidden, weight, targets, bias, **options)
