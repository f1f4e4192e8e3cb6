"""Chunked pure-PyTorch backend: the Triton kernels' readable twin, for any device.

Scored rows are processed ``chunk_size`` tokens at a time; a chunk's ``[chunk, V]`` logits
are the largest temporary (about 64 MiB in fp32 by default) and are recomputed in backward.
Implements the interface of :mod:`fused_losses.backends` with the kernels' names (``lse``,
``grad_logits``) so the two read side by side.
Logits are formed in fp32 whatever the input dtype (float64 inputs stay float64, so
``gradcheck`` runs on this backend), as the Triton kernels do: 16-bit logits rounded to bf16
before the reduction are off by up to 0.2 nats at a logit spread of 25, and fp16 logits above
65504 are inf. dW accumulates in fp32 across chunks. The logit gradient is stored in the
input dtype for the two gradient matmuls, fp16 scaled per token (``kernels/scaling.py``).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..kernels import scaling

# A chunk's fp32 logits. On 2 CPU cores, logits GEMMs with fewer rows run slower (31 GF/s at
# 128 rows, 46 at 262, 52-53 from 512: benchmarks/results/gemm_shapes_cpu.txt); interleaved
# A/B at N=4096, V=32000: 262 rows 1.48x naive, 512 rows 1.27x (benchmarks/notes.md).
CHUNK_BYTES = 64 << 20

NAME = "torch"
OPTIONS = frozenset({"chunk_size"})  # tokens per chunk; None = sized by CHUNK_BYTES
# forward_backward holds one whole group's fp32 logits at a time: up to the chunk budget.
ONE_PASS_BYTES = CHUNK_BYTES


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(num_rows: int, vocab: int, chunk_size: int | None,
            boundaries: list[int] | None = None) -> Iterator[slice]:
    """Row slices of about ``size`` rows; with ``boundaries`` (increasing group end offsets,
    the last = num_rows) a slice ends only at a boundary, so groups are never split."""
    size = chunk_size or max(1, CHUNK_BYTES // (4 * vocab))
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


class _Workspace:
    """[rows, V] chunk buffers allocated once per call and reused by every chunk.

    Besides avoiding hidden temporaries, this keeps the process's peak RSS honest: glibc
    serves blocks under its (dynamic, up to 32 MiB) mmap threshold from the heap and keeps
    them there after ``free``, so a fresh chunk-sized temporary per chunk inflates RSS far
    beyond what is live (measured: 359 MB vs 206 MB for N=4096, V=32000).
    """

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device, self.buffers = vocab, device, {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows:  # a group larger than the budget grows it
            buf = self.buffers[name] = torch.empty(rows, self.vocab, dtype=dtype,
                                                   device=self.device)
        return buf[:rows]


# 16-bit weights are upcast this many bytes of fp32 rows at a time on devices whose matmul
# cannot write fp32 from 16-bit operands (the CPU): never a full fp32 copy of the head.
UPCAST_BYTES = 16 << 20
_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()  # torch.mm(out_dtype=...)


def _matmul_fp32(hidden_chunk, weight, bias, out):
    """``out [n, V] = hidden_chunk @ weight.T + bias`` in ``out``'s dtype from 16-bit operands."""
    if hidden_chunk.is_cuda and _HAS_OUT_DTYPE:  # cuBLAS: 16-bit operands, fp32 output
        torch.mm(hidden_chunk, weight.T, out_dtype=out.dtype, out=out)
    else:
        hidden_up = hidden_chunk.to(out.dtype)
        step = max(1, UPCAST_BYTES // (out.element_size() * max(weight.shape[1], 1)))
        for v0 in range(0, weight.shape[0], step):
            out[:, v0:v0 + step] = hidden_up @ weight[v0:v0 + step].to(out.dtype).T
    if bias is not None:
        out += bias.to(out.dtype)


def _addmm_fp32(acc, a, b, scale=None):
    """``acc += (a @ b) * scale`` into the fp32 ``acc`` from 16-bit operands, the fp32
    products of their values (no rounding to 16 bits) and no ``acc``-sized 16-bit copy: cuBLAS
    accumulates in place (``out_dtype``); fp16's ``scale`` (a 0-dim fp32 tensor, read on the
    device: no host sync) takes one fp32 product beside ``acc``. Elsewhere (the CPU) ``a`` is
    upcast ``UPCAST_BYTES`` of rows at a time. On CUDA without ``out_dtype`` (torch < 2.8) the
    product is rounded to 16 bits, then added in fp32."""
    if a.is_cuda:
        if not _HAS_OUT_DTYPE:
            acc.add_(a @ b if scale is None else (a @ b).float().mul_(scale))
        elif scale is None:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype).mul_(scale))
        return
    b_up = b.to(acc.dtype)
    if scale is not None:
        b_up.mul_(scale)
    step = max(1, UPCAST_BYTES // (acc.element_size() * max(a.shape[1], 1)))
    for r0 in range(0, a.shape[0], step):
        acc[r0:r0 + step].addmm_(a[r0:r0 + step].to(acc.dtype), b_up)


def _logits(hidden_chunk, weight, bias, temperature, softcap, ws: _Workspace) -> torch.Tensor:
    """[n, H] -> [n, V] tempered, soft-capped logits in the accumulation dtype (workspace)."""
    rows, acc = hidden_chunk.shape[0], _acc_dtype(hidden_chunk.dtype)
    logits = ws.get("logits", rows, acc)
    if acc == hidden_chunk.dtype:
        if bias is None:
            torch.mm(hidden_chunk, weight.T, out=logits)
        else:
            torch.addmm(bias, hidden_chunk, weight.T, out=logits)
    else:
        _matmul_fp32(hidden_chunk, weight, bias, logits)
    if temperature != 1.0:
        logits.mul_(1.0 / temperature)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _stats(logits, targets, with_argmax, with_entropy, with_logits_mean, scratch,
           keep_probs=False):
    """Per-token (logprobs, lse, argmax, entropy, logits_mean) of one chunk; [n] each.

    ``scratch`` [n, V] receives exp(z - max); it may be ``logits`` itself (then destroyed),
    except with the entropy, which needs both. ``keep_probs`` leaves softmax(z) in it.
    Non-finite logits as ``fused_losses.backends`` says: torch's max already propagates NaN
    and picks the first NaN; ``-inf - max`` is ``-inf`` (p = 0); ``inf - inf`` is NaN.
    """
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    if with_argmax:
        maxes, argmax = logits.max(dim=-1)
    else:
        maxes, argmax = logits.amax(dim=-1), None
    logits_mean = logits.mean(dim=-1) if with_logits_mean else None
    probs = torch.sub(logits, maxes.unsqueeze(1), out=scratch).exp_()  # unnormalised
    sumexp = probs.sum(dim=-1)
    lse = maxes + sumexp.log()
    entropy = None
    if with_entropy:
        # p * z is 0, not NaN, at -inf logits: they are raised to the dtype's lowest finite
        # value (their p stays exactly 0; argmax, mean and target were taken above)
        logits.clamp_(min=torch.finfo(logits.dtype).min)
        entropy = lse - torch.linalg.vecdot(probs, logits) / sumexp
    if logits_mean is not None:  # a +inf logit gives an inf mean; the contract says NaN
        logits_mean = torch.where(lse.isnan(), float("nan"), logits_mean)
    if keep_probs:
        probs.div_(sumexp.unsqueeze(1))
    return target_logit - lse, lse, argmax, entropy, logits_mean


def _softcap_chain(logits, softcap, ws: _Workspace):
    """d(s·tanh(a/s))/da = 1 - (z/s)^2, taken from z before anything overwrites it."""
    if softcap is None:
        return None
    chain = torch.div(logits, softcap, out=ws.get("softcap", logits.shape[0], logits.dtype))
    return chain.square_().neg_().add_(1.0)


def _grad_logits(logits, targets, lse, entropy, grad_logprobs, grad_lse, grad_entropy,
                 grad_logits_mean, temperature, chain, filter_eps, ws: _Workspace,
                 holds_probs=False):
    """dL/d(raw logits) of one chunk, computed in place over ``logits``; [n, V].

    ``logits`` holds z, or softmax(z) already when ``holds_probs`` (no entropy gradient then:
    it needs z). ``chain`` is the soft-cap factor from :func:`_softcap_chain` or None.
    """
    rows, vocab = logits.shape
    coef = torch.zeros_like(lse)
    if grad_lse is not None:
        coef += grad_lse
    if grad_logprobs is not None:
        coef -= grad_logprobs

    def drop_filtered(probs):  # p itself is compared; NaN < eps is false: NaN survives
        if filter_eps is not None:
            probs.masked_fill_(probs < filter_eps, 0.0)
        return probs

    if grad_entropy is not None:
        if holds_probs:
            raise RuntimeError("the entropy gradient needs the logits, not the probabilities")
        # p * (coef - e * (z - mu)), mu = lse - entropy; 0 where p = 0 (a -inf logit)
        probs = torch.sub(logits, lse.unsqueeze(1), out=ws.get("scratch", rows, logits.dtype))
        probs = drop_filtered(probs.exp_())
        grad = logits.sub_((lse - entropy).unsqueeze(1)).mul_(-grad_entropy.unsqueeze(1))
        grad.add_(coef.unsqueeze(1)).mul_(probs).masked_fill_(probs == 0, 0.0)
    elif holds_probs:
        grad = drop_filtered(logits).mul_(coef.unsqueeze(1))
    else:
        grad = drop_filtered(logits.sub_(lse.unsqueeze(1)).exp_()).mul_(coef.unsqueeze(1))
    if grad_logprobs is not None:
        grad.scatter_add_(1, targets.unsqueeze(1), grad_logprobs.unsqueeze(1))
    if grad_logits_mean is not None:
        grad.add_(grad_logits_mean.unsqueeze(1) / vocab)
    if chain is not None:
        grad.mul_(chain)
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

    def add(self, grad_logits, rows, hidden_chunk, ws: _Workspace, bound=None):
        """Add one chunk's [n, V] logit gradient (fp32); ``bound`` [n] from
        :func:`scaling.grad_bound` when the weight is fp16 (see ``kernels/scaling.py``)."""
        if self.grad_bias is not None:  # before any scaling
            self.grad_bias += grad_logits.sum(0)
        grad_low = grad_logits
        if grad_logits.dtype != self.weight.dtype:
            if bound is not None:
                grad_logits.div_(bound.unsqueeze(1))
            grad_low = ws.get("low", grad_logits.shape[0], self.weight.dtype)
            grad_low.copy_(grad_logits)
        if self.grad_hidden is not None:
            part = grad_low @ self.weight
            if bound is not None:
                part = (part.float() * bound.unsqueeze(1)).to(part.dtype)
            self.grad_hidden.index_copy_(0, rows, part)
            del part  # not beside dW's update
        if self.grad_weight is not None:
            if grad_low.dtype == self.grad_weight.dtype:
                self.grad_weight.addmm_(grad_low.T, hidden_chunk)
            elif bound is None:
                _addmm_fp32(self.grad_weight, grad_low.T, hidden_chunk)
            else:  # fp16: rows times bound / max_bound (in [0, 1]), max_bound applied in fp32
                max_bound = bound.max()
                scaled = (hidden_chunk.float() * (bound / max_bound).unsqueeze(1))
                _addmm_fp32(self.grad_weight, grad_low.T, scaled.to(hidden_chunk.dtype),
                            max_bound)

    def result(self):
        dtype = self.weight.dtype
        return (self.grad_hidden,
                None if self.grad_weight is None else self.grad_weight.to(dtype),
                None if self.grad_bias is None else self.grad_bias.to(dtype))


@torch.no_grad()
def forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, chunk_size=None):
    """hidden [M, H], weight [V, H], rows [N], targets [N] -> 5 per-token [N] outputs."""
    parts, ws = [], _Workspace(weight.shape[0], hidden.device)
    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size):
        hidden_chunk = hidden.index_select(0, rows[piece])
        logits = _logits(hidden_chunk, weight, bias, temperature, softcap, ws)
        scratch = ws.get("scratch", logits.shape[0], logits.dtype) if with_entropy else logits
        parts.append(_stats(logits, targets[piece], with_argmax, with_entropy, with_logits_mean,
                            scratch))
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
    ws = _Workspace(weight.shape[0], hidden.device)

    def add_chunk(piece):  # a function: its rows and workspace views die before dW's cast
        hidden_chunk = hidden.index_select(0, rows[piece])
        logits = _logits(hidden_chunk, weight, bias, temperature, softcap, ws)

        def take(t):
            return None if t is None else t[piece]

        grads = [take(g) for g in (grad_logprobs, grad_lse, grad_entropy, grad_logits_mean)]
        grad = _grad_logits(logits, targets[piece], lse[piece], take(entropy), *grads,
                            temperature, _softcap_chain(logits, softcap, ws), filter_eps, ws)
        acc.add(grad, rows[piece], hidden_chunk, ws, _bound(weight, grads, take(entropy)))

    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size):
        add_chunk(piece)
    del ws  # its buffers, before dW's cast
    return acc.result()


def _bound(weight, grads, entropy):
    """Per-token scale of an fp16 gradient chunk (``kernels/scaling.py``); None otherwise."""
    if not scaling.needs_row_scale(weight.dtype):
        return None
    return scaling.grad_bound(*grads, entropy, weight.shape[0])


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
    ws = _Workspace(weight.shape[0], hidden.device)

    def add_chunk(piece):  # a function: its rows and workspace views die before dW's cast
        hidden_chunk = hidden.index_select(0, rows[piece])
        logits = _logits(hidden_chunk, weight, bias, temperature, softcap, ws)
        chain = _softcap_chain(logits, softcap, ws)
        # Without the entropy, softmax(z) is all the gradient needs, so it replaces z in the
        # one buffer; the entropy's statistics and gradient need z itself, kept beside it.
        scratch = ws.get("scratch", logits.shape[0], logits.dtype) if with_entropy else logits
        stats = _stats(logits, targets[piece], with_argmax, with_entropy, with_logits_mean,
                       scratch, keep_probs=not with_entropy)
        chunk_loss, grads = head(stats, piece)
        grad = _grad_logits(logits, targets[piece], stats[1], stats[3], *grads,
                            temperature, chain, filter_eps, ws, holds_probs=not with_entropy)
        acc.add(grad, rows[piece], hidden_chunk, ws, _bound(weight, grads, stats[3]))
        return chunk_loss

    for piece in _chunks(rows.numel(), weight.shape[0], chunk_size, boundaries):
        loss += add_chunk(piece)
    del ws  # its buffers, before dW's cast
    return (loss, *acc.result())
