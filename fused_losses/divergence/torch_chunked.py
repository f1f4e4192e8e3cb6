"""Chunked PyTorch twin of the distillation kernels, for any device.

Scored rows are taken ``chunk_size`` at a time. A chunk's two ``[chunk, V]`` logit buffers
(student and teacher, about 64 MiB each in fp32 by default) and two scratch buffers of half
that are the largest temporaries; the elementwise work runs over row blocks
(:func:`_rows`) that see whole rows of both models, so every per-token statistic is exact
in one pass and the student's logit gradient lands in the student buffer, ready for the dH
and dW GEMMs. Nothing ``[N, V]`` is ever held. Same argument names and outputs as
``triton_fused``; logits are formed and reduced in fp32 (float64 inputs stay float64, so
``gradcheck`` runs here).

Per token, with ``s = z_student / τ``, ``t = z_teacher / τ``, ``log q = s − lse(s)``,
``log p = t − lse(t)`` and ``δ = log p − log q`` (P teacher, Q student)::

    forward_kl  D = Σ p δ                                    dD/ds = q − p
    reverse_kl  D = −Σ q δ                                   dD/ds = −q (δ + D)
    jsd         d = δ + log(β/(1−β)), σ⁺ = softplus
                D = H(β) − β Σ p σ⁺(−d) − (1−β) Σ q σ⁺(d)     dD/ds = −(1−β) q (σ⁺(d) − S),
                S = Σ q σ⁺(d),  H(β) = −β log β − (1−β) log(1−β)

(derived in ``fused_losses/divergence/__init__.py``). The hard term's log-prob of the target
is taken at temperature 1: ``z_y − lse(z)``, gradient ``onehot(y) − softmax(z)``.
"""
from __future__ import annotations

import math

import torch

from ..backends.torch_chunked import _Accumulator, _Workspace, _acc_dtype, _chunks, _logits
from ..kernels import scaling

# The elementwise work runs over row blocks whose two temporaries take about this much each:
# half a default chunk. Each block costs ~20 ATen calls, and on 2 loaded CPU cores a call's
# fixed cost dominates small blocks: for 512 rows at V = 32000, JSD's statistics and
# gradient took 0.25 s of CPU in 32-64 MiB blocks, 0.3-0.5 s in 16 MiB, 1-1.7 s in 4 MiB
# and 2-4 s in 0.25-1 MiB blocks (interleaved, load ~10).
ROW_BLOCK_BYTES = 32 << 20


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In place (ATen's fused row kernel: one pass over memory). Row blocks are contiguous;
    the fused kernel is wrong in place on a strided view, hence the check."""
    if not x.is_contiguous():
        raise RuntimeError("internal: row blocks must be contiguous")
    return torch._log_softmax(x, 1, False, out=x)


def finite_or_nan(grad_divergence: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """The upstream gradient of the divergence, NaN on the rows whose divergence is not
    finite: an infinite KL (a masked logit where the other model has mass) has no
    derivative, so its row's logit gradient is NaN, as for a row with a NaN or +inf logit
    (``fused_losses.backends``: then NaN reaches every entry of dW and dBias)."""
    return torch.where(divergence.isfinite(), grad_divergence, float("nan"))


def _rows(student, teacher, targets, scratch, ones, kind, beta, temperature, with_logprobs,
          grad_divergence=None, grad_logprobs=None):
    """Per-token statistics of a row block; with upstream grads, its logit gradient.

    ``student`` [r, V]: raw logits z; ``teacher`` [r, V]: t = z_teacher / τ; both contiguous
    and consumed. ``scratch``: two [r, V] buffers; ``ones`` [V]. Returns (divergence,
    logprobs, lse, teacher_lse, raw_lse, aux) [r] each (see ``forward``); when
    ``grad_divergence`` or ``grad_logprobs`` [r] is given, ``student`` ends holding dL/dz.
    Everything comes from two fused log-softmaxes and about ten elementwise passes with no
    [r, V] temporary beyond ``scratch``: on a CPU each pass costs a noticeable fraction of
    the GEMMs, so the formulas are arranged to need few.

    ``-inf`` logits (a vocabulary mask) have probability 0 and contribute 0·log 0 = 0: in a
    row whose two lse are finite, every NaN of a per-column term is such a product (0 times
    an infinite log-ratio), so the sums skip NaN (``nansum``) and the gradient terms are
    zeroed where NaN. A probability > 0 against a masked logit of the other model gives a
    KL of +inf (:func:`finite_or_nan`). Rows with a NaN lse (a NaN or +inf logit, or only
    -inf) are NaN throughout.
    """
    first, second = scratch
    want_grad = grad_divergence is not None or grad_logprobs is not None
    raw_log = None  # log softmax(z) at temperature 1, when it differs from log q
    if with_logprobs and temperature != 1.0:
        raw_log = torch.log_softmax(student, dim=1)  # a block-sized temporary; rare path
    # lse = max(x) − max(log softmax(x)): exact whichever columns are masked, and NaN exactly
    # in the contract's NaN rows (two max passes, cheaper than a logsumexp)
    top, teacher_top = student.amax(1), teacher.amax(1)
    if temperature != 1.0:
        student.mul_(1.0 / temperature)
    log_q, log_p = _log_softmax_(student), _log_softmax_(teacher)
    lse = top * (1.0 / temperature) - log_q.amax(1)
    teacher_lse = teacher_top - log_p.amax(1)
    nan_rows = lse.isnan() | teacher_lse.isnan()
    raw_lse, logprobs = None, None
    if with_logprobs:
        source = log_q if raw_log is None else raw_log
        logprobs = source.gather(1, targets.unsqueeze(1)).squeeze(1)
        if raw_log is not None:
            raw_lse = top - raw_log.amax(1)

    aux = None
    if kind == "forward_kl":                                          # D = Σ p (log p − log q)
        p = torch.exp(log_p, out=second)
        delta = log_p.sub_(log_q)
        divergence = torch.nansum(torch.mul(p, delta, out=first), 1)
    elif kind == "reverse_kl":                                        # D = Σ q (log q − log p)
        q = torch.exp(log_q, out=first)
        delta = log_q.sub_(log_p)
        divergence = torch.nansum(torch.mul(q, delta, out=second), 1)
    else:
        # σ⁺(d) = L + c with L = logaddexp(δ, −c), c = log(β/(1−β)), and σ⁺(−d) = L − δ:
        # the shift never touches an element. S = Σ q σ⁺(d) = Σ q L + c.
        shift = math.log(beta) - math.log1p(-beta)
        q, p = torch.exp(log_q, out=first), torch.exp(log_p, out=second)
        delta = log_p.sub_(log_q)
        tail = torch.logaddexp(delta, torch.full((), -shift, dtype=delta.dtype), out=log_q)
        softplus_neg = torch.sub(tail, delta, out=delta)              # σ⁺(−d), exact per element
        p_term = torch.nansum(torch.mul(p, softplus_neg, out=p), 1)   # R = Σ p σ⁺(−d)
        q_tail = torch.mul(q, tail, out=second).nan_to_num_(nan=0.0)  # q L, 0 where q = 0
        aux = torch.mv(q_tail, ones) + shift                          # S
        entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        divergence = entropy - beta * p_term - (1 - beta) * aux
    divergence = torch.where(nan_rows, float("nan"), divergence)
    if kind == "reverse_kl":
        aux = divergence
    if not want_grad:
        return divergence, logprobs, lse, teacher_lse, raw_lse, aux
    if grad_divergence is None:  # no divergence term (not even 0 times an infinite one)
        q = torch.exp(log_q, out=first) if kind == "forward_kl" else q
        slope = student.zero_()
    else:  # dL/dz = coef · dD/ds + the hard term, coef = g_D / τ per row
        coef = finite_or_nan(grad_divergence / temperature, divergence).unsqueeze(1)
        if kind == "forward_kl":                                      # q − p
            q = torch.exp(log_q, out=first)
            slope = torch.sub(q, p, out=student).mul_(coef)
        elif kind == "reverse_kl":                                    # q (log q − log p − D)
            slope = delta.sub_(divergence.unsqueeze(1)).mul_(q).nan_to_num_(
                nan=0.0, posinf=math.inf, neginf=-math.inf).mul_(coef)
        else:                                                         # −(1−β) q (σ⁺(d) − S)
            slope = torch.mul(q_tail.addcmul_(q, (shift - aux).unsqueeze(1)),
                              coef * (beta - 1), out=student)
    if grad_logprobs is not None:  # + g_lp · (onehot(y) − softmax(z))
        g = grad_logprobs.unsqueeze(1)
        slope.addcmul_(q if raw_log is None else raw_log.exp_(), g, value=-1)
        slope.scatter_add_(1, targets.unsqueeze(1), g)
    return divergence, logprobs, lse, teacher_lse, raw_lse, aux


class _Chunk:
    """Both models' logits for a chunk of scored rows, in two reused [rows, V] buffers."""

    def __init__(self, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                 temperature, chunk_rows):
        vocab, device = weight.shape[0], hidden.device
        self.student_ws, self.teacher_ws = _Workspace(vocab, device), _Workspace(vocab, device)
        self.inputs = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
        self.temperature = temperature
        acc = _acc_dtype(hidden.dtype)
        # never more rows than the longest chunk: a small chunk_size bounds the scratch too
        rows_per_block = max(1, min(ROW_BLOCK_BYTES // (acc.itemsize * vocab), chunk_rows))
        self.scratch = tuple(torch.empty(rows_per_block, vocab, dtype=acc, device=device)
                             for _ in range(2))
        self.ones = torch.ones(vocab, dtype=acc, device=device)

    def logits(self, rows: torch.Tensor):
        """(hidden rows [n, H], raw student logits [n, V], teacher logits / τ [n, V])."""
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = self.inputs
        hidden_chunk = hidden.index_select(0, rows)
        student = _logits(hidden_chunk, weight, bias, 1.0, None, self.student_ws)
        teacher = _logits(teacher_hidden.index_select(0, rows), teacher_weight, teacher_bias,
                          self.temperature, None, self.teacher_ws)
        if teacher.dtype != student.dtype:  # a float64 student with a lower-precision teacher
            teacher = teacher.to(student.dtype)
        return hidden_chunk, student, teacher

    def blocks(self, size: int):
        step = self.scratch[0].shape[0]
        for start in range(0, size, step):
            stop = min(start + step, size)
            yield slice(start, stop), tuple(s[:stop - start] for s in self.scratch)


def _run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets, *,
         kind, beta, temperature, with_logprobs, chunk_size, grads=None, accumulator=None):
    """Walk the chunks; per row block, statistics and (with ``grads``) the logit gradient."""
    pieces = list(_chunks(rows.numel(), weight.shape[0], chunk_size))
    chunk = _Chunk(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   temperature, max((piece.stop - piece.start for piece in pieces), default=0))
    parts = []
    for piece in pieces:
        hidden_chunk, student, teacher = chunk.logits(rows[piece])
        chunk_targets = targets[piece]
        upstream = [None if g is None else g[piece] for g in grads or (None, None)]
        first = len(parts)
        for block, scratch in chunk.blocks(student.shape[0]):
            block_grads = {} if grads is None else dict(
                grad_divergence=None if upstream[0] is None else upstream[0][block],
                grad_logprobs=None if upstream[1] is None else upstream[1][block])
            parts.append(_rows(student[block], teacher[block], chunk_targets[block], scratch,
                               chunk.ones, kind, beta, temperature, with_logprobs, **block_grads))
        if accumulator is not None:
            bound = None
            if scaling.needs_row_scale(weight.dtype):  # fp16 chunks: kernels/scaling.py
                aux = None if kind != "reverse_kl" else torch.cat(
                    [part[5] for part in parts[first:]])
                bound = scaling.divergence_grad_bound(kind, beta, temperature, aux, *upstream)
            accumulator.add(student, rows[piece], hidden_chunk, chunk.student_ws, bound)
    if not parts:
        empty = hidden.new_zeros(0, dtype=_acc_dtype(hidden.dtype))
        return (empty, empty if with_logprobs else None, empty, empty,
                empty if with_logprobs and temperature != 1.0 else None,
                None if kind == "forward_kl" else empty)
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


@torch.no_grad()
def forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
            *, kind, beta, temperature, with_logprobs, chunk_size=None):
    """Per-token statistics of the scored ``rows``.

    hidden [M, H], weight [V, H], bias [V] | None, teacher_hidden [M, H_t], teacher_weight
    [V, H_t], teacher_bias [V] | None, rows [N] int64, targets [N] ->
    (divergence, logprobs | None, lse, teacher_lse, raw_lse | None, aux | None), [N] each:
    the divergence, the target's log-prob at temperature 1 (``with_logprobs``), both models'
    log-sum-exp at temperature τ, the student's at temperature 1 (only when τ ≠ 1 and
    ``with_logprobs``), and ``aux``: D itself for ``reverse_kl``, S for ``jsd``.
    """
    return _run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                targets, kind=kind, beta=beta, temperature=temperature,
                with_logprobs=with_logprobs, chunk_size=chunk_size)


@torch.no_grad()
def backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
             stats, grad_divergence, grad_logprobs, *, kind, beta, temperature, with_logprobs,
             need_hidden=True, need_weight=True, need_bias=True, chunk_size=None):
    """Recompute both models' logits chunk by chunk; return (dH [M, H], dW [V, H], dBias [V]).

    ``stats`` (the forward's outputs) are not read: a chunk's row blocks hold whole rows, so
    their statistics are recomputed exactly on data already in cache.
    """
    accumulator = _Accumulator(hidden, weight, bias, need_hidden, need_weight, need_bias)
    _run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, targets,
         kind=kind, beta=beta, temperature=temperature, with_logprobs=with_logprobs,
         chunk_size=chunk_size, grads=(grad_divergence, grad_logprobs), accumulator=accumulator)
    return accumulator.result()


@torch.no_grad()
def forward_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                     targets, *, divergence_weight, logprob_weight, kind, beta, temperature,
                     with_logprobs, need_hidden=True, need_weight=True, need_bias=True,
                     chunk_size=None):
    """One pass for ``loss = Σ_rows divergence_weight·D + logprob_weight·logprobs``.

    Each chunk's logits are formed once, for the statistics and the gradient: the student's
    and the teacher's GEMM plus dH and dW, 4 matmuls instead of 6. Returns
    (loss, stats as in ``forward``, dH, dW, dBias).
    """
    accumulator = _Accumulator(hidden, weight, bias, need_hidden, need_weight, need_bias)
    acc = _acc_dtype(hidden.dtype)
    num_rows = rows.numel()
    grads = (torch.full((num_rows,), divergence_weight, dtype=acc, device=hidden.device),
             torch.full((num_rows,), logprob_weight, dtype=acc, device=hidden.device)
             if with_logprobs else None)
    stats = _run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows,
                 targets, kind=kind, beta=beta, temperature=temperature,
                 with_logprobs=with_logprobs, chunk_size=chunk_size, grads=grads,
                 accumulator=accumulator)
    loss = divergence_weight * stats[0].sum()
    if with_logprobs:
        loss = loss + logprob_weight * stats[1].sum()
    return (loss, stats, *accumulator.result())
