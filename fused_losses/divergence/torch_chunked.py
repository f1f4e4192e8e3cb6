"""Chunked PyTorch twin of the distillation kernels, for any device.

Scored rows are taken ``chunk_size`` at a time. A chunk's two ``[chunk, V]`` logit buffers
(student and teacher, about 64 MiB each in fp32 by default) are the largest temporaries; all
the elementwise work then runs over row blocks of a few MiB (:func:`_rows`), which see whole
rows of both models, so every per-token statistic is exact in one pass and the student's
logit gradient lands in the student buffer, ready for the dH and dW GEMMs. Nothing
``[N, V]`` is ever held. Same argument names and outputs as ``triton_fused``; logits are
reduced in fp32 (float64 inputs stay float64, so ``gradcheck`` runs here).

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

from .._torch_backend import CHUNK_BYTES, _Accumulator, _Workspace, _acc_dtype, _chunks, _logits

# The elementwise work runs over row blocks whose temporaries take about this much.
ROW_BLOCK_BYTES = 4 << 20


def _lse(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of ``x`` [r, V]; ``scratch`` [r, V] is overwritten."""
    top = x.amax(dim=-1)
    return top + torch.sub(x, top.unsqueeze(1), out=scratch).exp_().sum(dim=-1).log_()


def _rows(student, teacher, targets, scratch, kind, beta, temperature, with_logprobs,
          grad_divergence=None, grad_logprobs=None):
    """Per-token statistics of a row block; with upstream grads, its logit gradient.

    ``student`` [r, V]: raw logits z; ``teacher`` [r, V]: t = z_teacher / τ; both are
    consumed. ``scratch``: two [r, V] buffers. Returns (divergence, logprobs, lse, teacher_lse,
    raw_lse, aux) [r] each (see ``forward``); when ``grad_divergence`` or ``grad_logprobs``
    [r] is given, ``student`` ends holding dL/dz (raw logits).
    """
    first, second = scratch
    want_grad = grad_divergence is not None or grad_logprobs is not None
    target_logit = student.gather(1, targets.unsqueeze(1)).squeeze(1) if with_logprobs else None
    raw_lse = _lse(student, first) if with_logprobs and temperature != 1.0 else None
    if temperature != 1.0:
        student.mul_(1.0 / temperature)
    lse = _lse(student, first)
    log_q = student.sub_(lse.unsqueeze(1))
    teacher_lse = _lse(teacher, first)
    log_p = teacher.sub_(teacher_lse.unsqueeze(1))

    aux = None
    if kind == "forward_kl":
        p = torch.exp(log_p, out=first)
        delta = torch.sub(log_p, log_q, out=second)
        divergence = torch.linalg.vecdot(p, delta)
        if want_grad:
            q = torch.exp(log_q, out=second)
            grad = torch.sub(q, p, out=first)                          # q − p
    elif kind == "reverse_kl":
        delta = torch.sub(log_p, log_q, out=second)
        q = torch.exp(log_q, out=first)
        divergence = aux = -torch.linalg.vecdot(q, delta)
        if want_grad:
            grad = delta.add_(divergence.unsqueeze(1)).mul_(q).neg_()  # −q (δ + D)
    else:
        ratio = math.log(beta) - math.log1p(-beta)
        d = torch.sub(log_p, log_q, out=first).add_(ratio)
        softplus_neg = torch.neg(d, out=second)
        torch.logaddexp(softplus_neg, torch.zeros((), dtype=d.dtype), out=softplus_neg)
        p = log_p.exp_()
        p_term = torch.linalg.vecdot(p, softplus_neg)                  # Σ p σ⁺(−d)
        softplus = torch.logaddexp(d, torch.zeros((), dtype=d.dtype), out=d)
        q = torch.exp(log_q, out=second)
        aux = torch.linalg.vecdot(q, softplus)                         # S = Σ q σ⁺(d)
        entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        divergence = entropy - beta * p_term - (1 - beta) * aux
        if want_grad:
            grad = softplus.sub_(aux.unsqueeze(1)).mul_(q).mul_(beta - 1)  # −(1−β) q (σ⁺ − S)

    logprobs = None
    if with_logprobs:
        logprobs = target_logit - (lse if raw_lse is None else raw_lse)
    if want_grad:
        _grad_raw(student, grad, q, log_q, targets, lse, raw_lse, temperature,
                  grad_divergence, grad_logprobs)
    return divergence, logprobs, lse, teacher_lse, raw_lse, aux


def _grad_raw(student, grad, q, log_q, targets, lse, raw_lse, temperature, grad_divergence,
              grad_logprobs):
    """``student`` <- g_D · dD/ds / τ + g_lp · (onehot(y) − softmax(z)).

    ``student`` still holds log q; softmax(z) at temperature 1 is ``q`` when τ = 1, else
    ``exp(τ·log q + τ·lse − raw_lse)``, formed in place over log q.
    """
    coef = None if grad_divergence is None else (grad_divergence / temperature).unsqueeze(1)
    if grad_logprobs is None:
        torch.mul(grad, coef, out=student)
        return
    g = grad_logprobs.unsqueeze(1)
    if raw_lse is None:  # softmax(z) = q; student (log q) is free
        torch.mul(q, g, out=student).neg_()
    else:
        shift = (temperature * lse - raw_lse).unsqueeze(1)
        log_q.mul_(temperature).add_(shift).exp_().mul_(g).neg_()
    if coef is not None:
        student.addcmul_(grad, coef)
    student.scatter_add_(1, targets.unsqueeze(1), g)


class _Chunk:
    """Both models' logits for a chunk of scored rows, in two reused [rows, V] buffers."""

    def __init__(self, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                 temperature):
        vocab, device = weight.shape[0], hidden.device
        self.student_ws, self.teacher_ws = _Workspace(vocab, device), _Workspace(vocab, device)
        self.inputs = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
        self.temperature = temperature
        acc = _acc_dtype(hidden.dtype)
        rows_per_block = max(1, ROW_BLOCK_BYTES // (acc.itemsize * vocab))
        self.scratch = tuple(torch.empty(rows_per_block, vocab, dtype=acc, device=device)
                             for _ in range(2))

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
    chunk = _Chunk(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   temperature)
    parts = []
    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size):
        hidden_chunk, student, teacher = chunk.logits(rows[piece])
        chunk_targets = targets[piece]
        for block, scratch in chunk.blocks(student.shape[0]):
            upstream = {} if grads is None else dict(
                grad_divergence=None if grads[0] is None else grads[0][piece][block],
                grad_logprobs=None if grads[1] is None else grads[1][piece][block])
            parts.append(_rows(student[block], teacher[block], chunk_targets[block], scratch,
                               kind, beta, temperature, with_logprobs, **upstream))
        if accumulator is not None:
            accumulator.add(student, rows[piece], hidden_chunk, chunk.student_ws)
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
