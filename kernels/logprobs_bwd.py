"""Backward: recompute the logits once, one vocabulary chunk at a time, and feed each chunk's
logit gradient to two GEMMs.

For each chunk of ``VC`` vocabulary columns ``[v0, v0 + VC)`` (``VC`` sized so the chunk's
gradient takes about ``configs.GRAD_CHUNK_BYTES``):

1. ``_grad_logits_kernel``, grid ``(cdiv(N, BLOCK_N) * cdiv(VC, BLOCK_V),)`` in grouped order
   (``GROUP_N`` token tiles in a row reuse one weight tile from L2): recompute one
   ``[BLOCK_N, BLOCK_V]`` logit tile, form its fp32 gradient and store it in
   ``grad_chunk [N, VC]`` in the weight's dtype (fp16: row i divided by its bound, see
   ``scaling.py``), its column sums (for dBias) in ``bias_partials [cdiv(N, BLOCK_N), VC]``,
   and with ``FILTER`` whether any entry is nonzero after filtering in
   ``keep [cdiv(N, BLOCK_N), cdiv(VC, BLOCK_V)]``.
2. ``_grad_hidden_kernel``, grid ``(cdiv(N, BLOCK_N) * cdiv(H, BLOCK_OUT),)`` in grouped
   order over token tiles: ``grad_hidden[N, H] += grad_chunk @ weight[v0:v0 + VC]`` (K = VC)
   in an fp32 accumulator, read and written once per chunk (fp16: unscaled by the launcher
   once, at the end).
3. ``_grad_weight_kernel``, grid ``(cdiv(VC, BLOCK_V) * cdiv(H, BLOCK_OUT),)`` in grouped
   order over vocabulary tiles: ``grad_weight[v0:v0 + VC] = grad_chunkᵀ @ hidden[rows]``
   (K = N), summed in fp32 registers over every token and written once in the weight's
   dtype, so no fp32 ``[V, H]`` buffer (fp16: hidden rows times ``bound_i / max_bound``, the
   sum times ``max_bound``).

FLOPs: 2NHV of recompute and 4NHV of gradient GEMMs, 8NHV with the forward (floor: 6NHV).
Every program owns the outputs it writes: no atomics, bitwise reproducible. ``FILTER`` drops
the softmax terms where ``p < filter_eps`` (``fused_losses.backends``), and both GEMMs skip
the K blocks whose filtered gradient tile is zero everywhere, which is where filtering saves
time; the tiles of the GEMMs are the gradient tiles for that reason.

Program order of the two GEMMs (``_tl_helpers.grouped_tile``, the config's ``GROUP_N`` = G).
An output of TM x TN tiles reads a slab of operand A per row tile and of B per column tile.
Grouping G row tiles keeps their A slabs in L2 while all of B streams past once per group: A
is read from HBM about once, B TM / G times; grouping column tiles reads B once and A TN / G
times. With square b x b output tiles both streamed terms are 2·M·N·K / (b·G) bytes of
16-bit operands, and they cost HBM traffic only where the streamed operand does not fit L2
(~50 MB on an H200). At Llama-3-8B's head (N = 8192, H = 4096, V = 128256, bf16, b = 128,
G = 8):

- dH (A = grad_chunk [N, VC], B = W[chunk] [VC, H], VC = 4096): grouping token tiles reads
  64 MiB + 8 x 32 MiB = 320 MiB per chunk, grouping H tiles 32 + 4 x 64 = 288 MiB: even. In
  the one pass (1024-row chunks, K = V: A = 263 MB, B = all of W, 1.05 GB; 8 token tiles)
  grouping token tiles reads each once (1.3 GB), grouping H tiles re-reads the gradient 4
  times (2.1 GB): token tiles are grouped.
- dW (A = grad_chunkᵀ [VC, N], B = hidden[rows] [N, H]): both groupings read 64 MiB +
  4 x 64 MiB = 320 MiB per chunk. In the one pass (A = 263 MB, B = 8 MiB of hidden rows,
  L2-resident) grouping vocabulary tiles reads the gradient once (0.27 GB), grouping H
  tiles 4 times (1.06 GB): vocabulary tiles are grouped.

The plain 2-D grids these replace (row tile fastest) kept ~132 programs resident (one per SM:
129-192 KiB of shared memory each) on every row tile of one to four column tiles, so each
wave re-read the whole row operand: 1.0-2.1 GB per chunk for dH, 0.5-2.1 GB for dW at the
head above, and 8.4 GB (32 x 263 MB) per one-pass chunk for dW. Measured on an H200
(``benchmarks/notes.md``, G8): HBM reads per chunk 1.49 -> 0.55 GB for dH, 0.62 -> 0.46 GB
for dW, 10.5 -> 2.6 GB for the one pass's dW (fp32 accumulator included), 9-11 % faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch, configs, scaling
from ._tl_helpers import dot_acc, grad_logits_tile, grouped_tile, load_grad_stats, logits_tile


@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr,    # [M,H] [V,H] [V] [N] [N]
    lse_ptr, grad_logprobs_ptr, grad_lse_ptr,                   # [N] fp32 each
    grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,             # [N] fp32 each
    inv_bound_ptr,                                              # [N] fp32 (HAS_ROW_SCALE)
    grad_chunk_ptr, bias_partials_ptr, keep_ptr,                # -> [N, VC], [TN, VC], [TN, TV]
    N, H, v0, chunk_width,
    stride_hm, stride_hh, stride_wv, stride_wh,
    inv_vocab, inv_temperature, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, FILTER: tl.constexpr,
    NEED_BIAS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped program order: GROUP_N token tiles run back to back on one vocabulary tile, so
    # its weight rows come from L2 after the first.
    vocab_tiles = tl.cdiv(chunk_width, BLOCK_V)
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), vocab_tiles, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)           # column within the chunk
    mask_c = offs_c < chunk_width
    offs_v = v0 + offs_c.to(tl.int64)
    mask_v = mask_c                                             # a chunk ends inside V
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean = \
        load_grad_stats(offs_n, mask_n, targets_ptr, lse_ptr, grad_logprobs_ptr, grad_lse_ptr,
                        grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr, WITH_ENTROPY_GRAD,
                        WITH_MEAN_GRAD)
    logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v,
                         H, stride_hm, stride_hh, stride_wv, stride_wh,
                         inv_temperature, softcap, BLOCK_N, BLOCK_V, BLOCK_H,
                         HAS_BIAS, HAS_SOFTCAP, DOT_FP32, DOT_PRECISION)
    grad = grad_logits_tile(logits, offs_v, mask_n, mask_v, targets, lse, grad_logprobs,
                            grad_lse, grad_entropy, mu, grad_logits_mean, inv_vocab,
                            inv_temperature, softcap, filter_eps, HAS_SOFTCAP,
                            WITH_ENTROPY_GRAD, WITH_MEAN_GRAD, FILTER)  # [BLOCK_N, BLOCK_V] fp32
    stored = grad
    if HAS_ROW_SCALE:  # fp16: each row at most 1/temperature, so p * g cannot underflow
        stored = grad * tl.load(inv_bound_ptr + offs_n, mask=mask_n, other=1.0)[:, None]
    out = grad_chunk_ptr + offs_n.to(tl.int64)[:, None] * chunk_width + offs_c[None, :]
    tl.store(out, stored.to(grad_chunk_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])
    if NEED_BIAS_GRAD:
        tl.store(bias_partials_ptr + pid_n.to(tl.int64) * chunk_width + offs_c,
                 tl.sum(grad, axis=0), mask=mask_c)
    if FILTER:
        # skippable only if every entry is exactly 0 (NaN != 0 keeps a NaN tile)
        nonzero = tl.sum(tl.sum((grad != 0.0).to(tl.int32), axis=1), axis=0) > 0
        tl.store(keep_ptr + pid_n * vocab_tiles + pid_v, nonzero.to(tl.int8))


@triton.jit
def _grad_hidden_kernel(
    grad_chunk_ptr, weight_ptr, keep_ptr,                       # [N, VC], [V, H], [TN, TV]
    grad_hidden_ptr,                                            # [N, H] fp32, accumulated
    N, H, v0, chunk_width, stride_gn, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_N: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # GROUP_N token tiles' gradient rows stay in L2 while W[chunk] streams past them (see the
    # module docstring for why token tiles, not H tiles, are grouped)
    pid_n, pid_h = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_OUT),
                                GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_h = (pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    mask_h = offs_h < H
    out = grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * H + offs_h[None, :]
    out_mask = mask_n[:, None] & mask_h[None, :]
    acc = tl.load(out, mask=out_mask, other=0.0)                # [BLOCK_N, BLOCK_OUT] fp32
    vocab_tiles = tl.cdiv(chunk_width, BLOCK_V)
    for tile in range(0, vocab_tiles):
        keep = True
        if FILTER:
            keep = tl.load(keep_ptr + pid_n * vocab_tiles + tile) != 0
        if keep:
            offs_c = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_c = offs_c < chunk_width
            grad = tl.load(
                grad_chunk_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_c[None, :],
                mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_N, BLOCK_V]
            weight = tl.load(
                weight_ptr + (v0 + offs_c.to(tl.int64))[:, None] * stride_wv
                + offs_h[None, :] * stride_wh,
                mask=mask_c[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_V, BLOCK_OUT]
            acc = dot_acc(grad, weight, acc, DOT_FP32, DOT_PRECISION)
    tl.store(out, acc, mask=out_mask)


@triton.jit
def _grad_weight_kernel(
    grad_chunk_ptr, hidden_ptr, rows_ptr, keep_ptr,             # [N, VC], [M, H], [N], [TN, TV]
    ratio_ptr, max_bound_ptr,                                   # [N], [1] fp32 (HAS_ROW_SCALE)
    grad_weight_ptr,                                            # -> [V, H] contiguous, weight dtype
    N, H, v0, chunk_width, stride_gn, stride_hm, stride_hh,     # (ACCUMULATE: fp32, added to)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_V: tl.constexpr,
    FILTER: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # GROUP_V vocabulary tiles' gradient columns stay in L2 while the hidden rows stream past
    # them (see the module docstring for why vocabulary tiles, not H tiles, are grouped)
    vocab_tiles = tl.cdiv(chunk_width, BLOCK_V)
    pid_v, pid_h = grouped_tile(tl.program_id(0), vocab_tiles, tl.cdiv(H, BLOCK_OUT), GROUP_V)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_c = offs_c < chunk_width
    offs_h = (pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_V, BLOCK_OUT), dtype=tl.float32)
    for tile in range(0, tl.cdiv(N, BLOCK_N)):
        keep = True
        if FILTER:
            keep = tl.load(keep_ptr + tile * vocab_tiles + pid_v) != 0
        if keep:
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
            grad_t = tl.load(
                grad_chunk_ptr + offs_n.to(tl.int64)[None, :] * stride_gn + offs_c[:, None],
                mask=mask_c[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_V, BLOCK_N]
            hidden = tl.load(
                hidden_ptr + rows[:, None] * stride_hm + offs_h[None, :] * stride_hh,
                mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_N, BLOCK_OUT]
            if HAS_ROW_SCALE:  # the chunk's rows are divided by their bounds: undo per token
                ratio = tl.load(ratio_ptr + offs_n, mask=mask_n, other=0.0)
                hidden = (hidden.to(tl.float32) * ratio[:, None]).to(hidden_ptr.dtype.element_ty)
            acc = dot_acc(grad_t, hidden, acc, DOT_FP32, DOT_PRECISION)
    if HAS_ROW_SCALE:
        acc = acc * tl.load(max_bound_ptr)
    out = grad_weight_ptr + (v0 + offs_c.to(tl.int64))[:, None] * H + offs_h[None, :]
    out_mask = mask_c[:, None] & mask_h[None, :]
    if ACCUMULATE:  # the one-pass path: dW summed over token chunks in fp32
        acc += tl.load(out, mask=out_mask, other=0.0)
    tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=out_mask)


def grad_buffers(num_rows: int, weight: torch.Tensor, block_n: int, block_v: int,
                 chunk_bytes: int | None, need_hidden: bool, need_weight: bool,
                 need_bias: bool, spare: torch.Tensor):
    """The recompute backward's buffers (this one's and the distillation's): fp32 dH rows
    [N, H], dW [V, H] in the weight's dtype, fp32 dBias [V], the gradient chunk [N, columns],
    the per-token-tile bias partials [tiles, columns] (``spare`` stands in when not needed),
    the chunk's width and the token tiles. None where a gradient is not needed."""
    vocab, width = weight.shape
    f32 = dict(dtype=torch.float32, device=weight.device)
    grad_hidden_f32 = torch.zeros(num_rows, width, **f32) if need_hidden else None
    # Contiguous whatever weight's strides (a transposed head's zeros_like would not be): the
    # dW kernel writes row-major. Every entry is written when there are rows to visit.
    grad_weight = None
    if need_weight:
        grad_weight = (torch.empty if num_rows else torch.zeros)(
            vocab, width, dtype=weight.dtype, device=weight.device)
    grad_bias_f32 = torch.zeros(vocab, **f32) if need_bias else None
    columns = configs.chunk_width(num_rows, vocab, weight.element_size(), block_v,
                                  chunk_bytes or _launch.grad_chunk_bytes())
    token_tiles = triton.cdiv(num_rows, block_n)
    grad_chunk = torch.empty(num_rows, columns, dtype=weight.dtype, device=weight.device)
    bias_partials = torch.empty(token_tiles, columns, **f32) if need_bias else spare
    return (grad_hidden_f32, grad_weight, grad_bias_f32, grad_chunk, bias_partials, columns,
            token_tiles)


def packed(buffer: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The first ``rows * width`` elements of ``buffer`` as ``[rows, width]``: the kernels lay
    a chunk narrower than the buffer out with row stride ``width``, not the buffer's."""
    return buffer.view(-1)[:rows * width].view(rows, width)


def grad_hidden_gemm(grad_chunk, weight, v0, out, keep, cfg: dict, *, filtered: bool) -> None:
    """``out [N, H]`` fp32 ``+= grad_chunk [N, C] @ weight[v0:v0 + C]``; ``grad_chunk`` with
    inner stride 1 and any row stride (the one-pass path's gradient lies over fp32 rows);
    with ``filtered``, the K blocks ``keep`` marks zero are skipped."""
    num_rows, columns = grad_chunk.shape
    grid = (triton.cdiv(num_rows, cfg["BLOCK_N"]) * triton.cdiv(out.shape[1], cfg["BLOCK_OUT"]),)
    _grad_hidden_kernel[grid](
        grad_chunk, weight, keep, out, num_rows, out.shape[1], v0, columns,
        grad_chunk.stride(0), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_OUT=cfg["BLOCK_OUT"],
        GROUP_N=cfg["GROUP_N"], FILTER=filtered, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_launch.dot_flags(weight))


def grad_weight_gemm(grad_chunk, hidden, rows, v0, out, keep, ratio, max_bound, cfg: dict, *,
                     filtered: bool, accumulate: bool) -> None:
    """``out[v0:v0 + C] = grad_chunkᵀ @ hidden[rows]`` (``+=`` into an fp32 ``out`` with
    ``accumulate``); ``ratio``/``max_bound`` undo fp16 row scaling (``scaling.py``) when
    given; ``out`` contiguous [V, H]."""
    num_rows, columns = grad_chunk.shape
    width = out.shape[1]
    scaled = ratio is not None
    if not scaled:  # never read: any fp32 pointer
        ratio = max_bound = torch.empty(1, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(columns, cfg["BLOCK_V"]) * triton.cdiv(width, cfg["BLOCK_OUT"]),)
    _grad_weight_kernel[grid](
        grad_chunk, hidden, rows, keep, ratio, max_bound, out, num_rows, width, v0, columns,
        grad_chunk.stride(0), hidden.stride(0), hidden.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_OUT=cfg["BLOCK_OUT"],
        GROUP_V=cfg["GROUP_N"], FILTER=filtered, HAS_ROW_SCALE=scaled, ACCUMULATE=accumulate,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_launch.dot_flags(hidden))


def backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs, grad_lse,
             grad_entropy, grad_logits_mean, *, need_hidden=True, need_weight=True,
             need_bias=True, temperature=1.0, softcap=None, filter_eps=None, config=None,
             chunk_bytes=None):
    """Gradients (dH [M, H], dW [V, H] contiguous, dBias [V]) in the input dtype; None where
    not needed. hidden and weight may have any strides (a transposed head, a strided batch);
    the per-token vectors may too (an expanded upstream gradient): they are made contiguous."""
    _launch.check_inputs(hidden, weight, bias)
    bias, rows, targets, lse, entropy, grad_logprobs, grad_lse, grad_entropy, \
        grad_logits_mean = _launch.contiguous(bias, rows, targets, lse, entropy, grad_logprobs,
                                              grad_lse, grad_entropy, grad_logits_mean)
    num_rows, vocab, width = rows.numel(), weight.shape[0], weight.shape[1]
    need_bias = need_bias and bias is not None
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    cfg = config or _launch.config(
        "bwd", hidden, (num_rows, vocab, width),
        lambda c: backward(hidden, weight, bias, rows, targets, lse, entropy, grad_logprobs,
                           grad_lse, grad_entropy, grad_logits_mean, need_hidden=need_hidden,
                           need_weight=need_weight, need_bias=need_bias,
                           temperature=temperature, softcap=softcap, filter_eps=filter_eps,
                           config=c, chunk_bytes=chunk_bytes))
    meta = {k: cfg[k] for k in ("num_warps", "num_stages")}
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]

    zeros = torch.zeros(num_rows, **f32)
    with_entropy_grad = grad_entropy is not None
    with_mean_grad = grad_logits_mean is not None
    per_token = (
        lse, zeros if grad_logprobs is None else grad_logprobs,
        zeros if grad_lse is None else grad_lse,
        grad_entropy if with_entropy_grad else zeros,
        (lse - entropy) if with_entropy_grad else zeros,                # mu = sum_v p z
        grad_logits_mean if with_mean_grad else zeros,
    )
    flags = dict(FILTER=filter_eps is not None, **_launch.dot_flags(hidden))
    row_scale = scaling.needs_row_scale(weight.dtype) and num_rows > 0
    bound = max_bound = None
    if row_scale:
        bound = scaling.grad_bound(grad_logprobs, grad_lse, grad_entropy, grad_logits_mean,
                                   entropy, vocab)
        max_bound = bound.max().reshape(1)  # stays on the device: no host sync
    inv_bound, ratio = (1.0 / bound, bound / max_bound) if row_scale else (zeros, zeros)

    grad_hidden_f32, grad_weight, grad_bias_f32, grad_chunk, bias_partials, columns, \
        token_tiles = grad_buffers(num_rows, weight, block_n, block_v, chunk_bytes,
                                   need_hidden, need_weight, need_bias, zeros)
    keep = torch.empty(token_tiles, triton.cdiv(columns, block_v), dtype=torch.int8,
                       device=device)
    for v0 in range(0, vocab if num_rows else 0, columns):
        width_here = min(columns, vocab - v0)
        vocab_tiles = triton.cdiv(width_here, block_v)
        _grad_logits_kernel[(token_tiles * vocab_tiles,)](
            hidden, weight, bias if bias is not None else weight, rows, targets, *per_token,
            inv_bound, grad_chunk, bias_partials, keep,
            num_rows, width, v0, width_here,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / vocab, 1.0 / temperature, softcap or 1.0, filter_eps or 0.0,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"], GROUP_N=cfg["GROUP_N"],
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_ROW_SCALE=row_scale, WITH_ENTROPY_GRAD=with_entropy_grad,
            WITH_MEAN_GRAD=with_mean_grad, NEED_BIAS_GRAD=need_bias, **flags, **meta)
        if need_hidden:
            grad_hidden_gemm(packed(grad_chunk, num_rows, width_here), weight, v0,
                             grad_hidden_f32, keep, cfg, filtered=filter_eps is not None)
        if need_weight:
            grad_weight_gemm(packed(grad_chunk, num_rows, width_here), hidden, rows, v0,
                             grad_weight, keep, ratio if row_scale else None, max_bound, cfg,
                             filtered=filter_eps is not None, accumulate=False)
        if need_bias:
            torch.sum(packed(bias_partials, token_tiles, width_here), dim=0,
                      out=grad_bias_f32[v0:v0 + width_here])
    # Before dH's cast and scatter, lower peak: the chunk buffers (no view of them outlives
    # the loop), then the fp32 dH once cast, before the scatter's zeros_like.
    del grad_chunk, bias_partials, keep
    grad_hidden = None
    if need_hidden:
        if row_scale:
            grad_hidden_f32.mul_(bound.unsqueeze(1))
        grad_hidden = grad_hidden_f32.to(hidden.dtype)
        del grad_hidden_f32
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_hidden)
    grad_bias = grad_bias_f32.to(bias.dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias
