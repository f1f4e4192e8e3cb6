"""Chunked pure-PyTorch backend: the Triton kernels' readable twin, for any device.

Scored rows are processed ``chunk_size`` tokens at a time; a chunk's ``[chunk, V]`` logits
are the largest temporary (about 32 MiB in fp32 by default) and are recomputed in backward.
Same argument names as ``fused_losses.kernels`` so the autograd Function can pick either.
Logits are formed in the input dtype by the matmul and reduced in fp32 (float64 inputs stay
float64, so ``gradcheck`` runs on this backend); dW accumulates in fp32 across chunks.
"""
from __future__ import annotations

from typing import Iterator

import torch

_CHUNK_BYTES = 32 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(num_rows: int, vocab: int, chunk_size: int | None,
            boundaries: list[int] | None = None) -> Iterator[slice]:
    """Row slices of about ``size`` rows; with ``boundaries`` (increasing group end offsets,
    the last = num_rows) a slice ends only at a boundary, so groups are never split."""
    size = chunk_size or max(1, _CHUNK_BYTES // (4 * vocab))
    if boundaries is None:
        yield from (slice(s, min(s + size, num_rows)) for s in range(0, num_rows, size))
        return
    start = end = 0
    for boundary in boundaries:
        if boundary - start > size and end > start:
            yield slice(start, end)
            start = end
        end = boundary
    if end > start:
        yield slice(start, end)


def _logits(hidden_chunk, weight, bias, temperature, softcap) -> torch.Tensor:
    """[n, H] -> [n, V] tempered, soft-capped logits in the accumulation dtype."""
    if bias is None:
        logits = hidden_chunk @ weight.T
    else:
        logits = torch.addmm(bias, hidden_chunk, weight.T)
    logits = logits.to(_acc_dtype(logits.dtype))
    if temperature != 1.0:
        logits.mul_(1.0 / temperature)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _stats(logits, targets, with_argmax, with_entropy, with_logits_mean):
    """Per-token (logprobs, lse, argmax, entropy, logits_mean) of one chunk; [n] each."""
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    argmax = logits.argmax(dim=-1) if with_argmax else None
    entropy = None
    if with_entropy:
        probs = (logits - lse.unsqueeze(1)).exp_()
        entropy = lse - torch.linalg.vecdot(probs, logits)
    logits_mean = logits.mean(dim=-1) if with_logits_mean else None
    return logprobs, lse, argmax, entropy, logits_mean


def _grad_logits(logits, targets, lse, entropy, grad_logprobs, grad_lse, grad_entropy,
                 grad_logits_mean, temperature, softcap, filter_eps):
    """dL/d(raw logits) of one chunk, computed in place over ``logits``; [n, V]."""
    vocab = logits.shape[1]
    capped = logits.clone() if softcap is not None else None
    coef = torch.zeros_like(lse)
    if grad_lse is not None:
        coef += grad_lse
    if grad_logprobs is not None:
        coef -= grad_logprobs
    if grad_entropy is not None:
        # p * (coef - e * (z - mu)), mu = lse - entropy
        probs = (logits - lse.unsqueeze(1)).exp_()
        mu = lse - entropy
        grad = logits.sub_(mu.unsqueeze(1)).mul_(-grad_entropy.unsqueeze(1))
        grad.add_(coef.unsqueeze(1)).mul_(probs)
        del probs
    else:
        grad = logits.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    if grad_logprobs is not None:
        grad.scatter_add_(1, targets.unsqueeze(1), grad_logprobs.unsqueeze(1))
    if grad_logits_mean is not None:
        grad.add_(grad_logits_mean.unsqueeze(1) / vocab)
    if filter_eps is not None:
        grad.masked_fill_(grad.abs() < filter_eps, 0.0)
    if capped is not None:
        grad.mul_(1.0 - (capped / softcap).square_())
    if temperature != 1.0:
        grad.mul_(1.0 / temperature)
    return grad


class _Accumulator:
    """dH rows, fp32 dW and dBias built chunk by chunk."""

    def __init__(self, hidden, weight, bias, need_hidden, need_weight, need_bias):
        acc = _acc_dtype(weight.dtype)
        self.hidden, self.weight = hidden, weight
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        self.grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need_weight else None
        self.grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if (need_bias and bias is not None) else None

    def add(self, grad_logits, rows, hidden_chunk):
        grad_low = grad_logits.to(self.weight.dtype)
        if self.grad_hidden is not None:
            self.grad_hidden.index_copy_(0, rows, grad_low @ self.weight)
        if self.grad_weight is not None:
            if grad_low.dtype == self.grad_weight.dtype:
                self.grad_weight.addmm_(grad_low.T, hidden_chunk)
            else:
                self.grad_weight += (grad_low.T @ hidden_chunk).to(self.grad_weight.dtype)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0)

    def result(self):
        dtype = self.weight.dtype
        return (self.grad_hidden,
                None if self.grad_weight is None else self.grad_weight.to(dtype),
                None if self.grad_bias is None else self.grad_bias.to(dtype))


@torch.no_grad()
def forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, chunk_size=None):
    """hidden [M, H], weight [V, H], rows [N], targets [N] -> 5 per-token [N] outputs."""
    parts = []
    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size):
        logits = _logits(hidden.index_select(0, rows[piece]), weight, bias, temperature, softcap)
        parts.append(_stats(logits, targets[piece], with_argmax, with_entropy, with_logits_mean))
    if not parts:
        empty = hidden.new_zeros(0, dtype=_acc_dtype(hidden.dtype))
        return (empty, empty, rows.new_zeros(0) if with_argmax else None,
                empty if with_entropy else None, empty if with_logits_mean else None)
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


@torch.no_grad()
def backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, chunk_size=None):
    """Recompute each chunk's logits and accumulate (dH [M, H], dW [V, H], dBias [V])."""
    acc = _Accumulator(hidden, weight, bias, need_hidden, need_weight, need_bias)
    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size):
        hidden_chunk = hidden.index_select(0, rows[piece])
        logits = _logits(hidden_chunk, weight, bias, temperature, softcap)

        def take(t):
            return None if t is None else t[piece]

        grad = _grad_logits(logits, targets[piece], lse[piece], take(entropy),
                            take(grad_logprobs), take(grad_lse), take(grad_entropy),
                            take(grad_logits_mean), temperature, softcap, filter_eps)
        acc.add(grad, rows[piece], hidden_chunk)
    return acc.result()


@torch.no_grad()
def forward_backward(hidden, weight, bias, rows, targets, head, *, boundaries=None,
                     need_hidden=True, need_weight=True, need_bias=True, temperature=1.0,
                     softcap=None, filter_eps=None, with_argmax=False, with_entropy=False,
                     with_logits_mean=False, chunk_size=None):
    """One pass: stats, the head's upstream gradients and input gradients per chunk.

    ``head(5 per-token stats of a chunk, its row slice) -> (loss of the chunk, 4 upstream
    grads)``; chunks end only at ``boundaries``. Returns (loss, dH, dW, dBias); 3 matmuls
    per chunk instead of 4.
    """
    acc = _Accumulator(hidden, weight, bias, need_hidden, need_weight, need_bias)
    loss = torch.zeros((), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size, boundaries):
        hidden_chunk = hidden.index_select(0, rows[piece])
        logits = _logits(hidden_chunk, weight, bias, temperature, softcap)
        stats = _stats(logits, targets[piece], with_argmax, with_entropy, with_logits_mean)
        chunk_loss, grads = head(stats, piece)
        loss += chunk_loss
        grad = _grad_logits(logits, targets[piece], stats[1], stats[3], *grads,
                            temperature, softcap, filter_eps)
        acc.add(grad, rows[piece], hidden_chunk)
    return (loss, *acc.result())
