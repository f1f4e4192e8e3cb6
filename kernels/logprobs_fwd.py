"""Forward: per-token lse, target logit, argmax, entropy and mean-logit statistics.

Grid ``(cdiv(N, BLOCK_N) * SPLITS,)`` in grouped order (``GROUP_N`` token tiles with all their
splits, ``_tl_helpers.grouped_tile``): program (i, s) owns token tile i and the s-th contiguous
range of vocabulary tiles. It walks its range with an online log-sum-exp (running max ``m``,
``sum exp(z - m)``, and ``sum exp(z - m) * z`` for the entropy) and writes one partial per
(split, token); ``_combine`` merges the SPLITS partials on the host side in O(SPLITS * N).
No atomics, so results are bitwise reproducible.

Non-finite logits follow the contract of ``fused_losses.backends``: ``-inf`` logits weigh 0
(the online max never subtracts ``-inf`` from ``-inf``); a NaN or ``+inf`` logit makes the
row's sum NaN whatever the GPU's max does with NaN (``exp(NaN - m)`` and ``exp(inf - inf)``
are NaN), and with ``WITH_ARGMAX`` the first NaN is tracked explicitly and wins the argmax, as
in torch: a GPU's ``max``/``argmax`` ignore NaN where numpy and torch propagate it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._tl_helpers import grouped_tile, logits_tile, online_update


@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr,        # [M,H] [V,H] [V] [N] [N]
    max_ptr, sumexp_ptr, zdot_ptr, zsum_ptr, argmax_ptr, target_ptr,  # -> [SPLITS, N] each
    N, V, H, tiles_per_split, splits,
    stride_hm, stride_hh, stride_wv, stride_wh,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, WITH_LOGITS_MEAN: tl.constexpr, WITH_ARGMAX: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_N token tiles run with every split of theirs before the next group,
    # so the hidden rows of the resident programs stay in L2 while their splits stream W.
    pid_n, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zdot = tl.zeros((BLOCK_N,), dtype=tl.float32)      # sum exp(z - m) * z
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)      # sum z
    best = tl.zeros((BLOCK_N,), dtype=tl.int64)
    first_nan = tl.zeros((BLOCK_N,), dtype=tl.int64) + V    # V: none so far
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, mask_n, mask_v,
                             H, stride_hm, stride_hh, stride_wv, stride_wh,
                             inv_temperature, softcap, BLOCK_N, BLOCK_V, BLOCK_H,
                             HAS_BIAS, HAS_SOFTCAP, DOT_FP32, DOT_PRECISION)
        running_max, sumexp, zdot, zsum, best, first_nan, target_logit = online_update(
            logits, offs_v, mask_v, v_start, targets, V, running_max, sumexp, zdot, zsum, best,
            first_nan, target_logit, WITH_ENTROPY, WITH_LOGITS_MEAN, WITH_ARGMAX)

    if WITH_ARGMAX:
        # a split with a NaN reports its first NaN, and a NaN max for _combine to see
        has_nan = first_nan < V
        best = tl.where(has_nan, first_nan, best)
        running_max = tl.where(has_nan, float("nan"), running_max)
    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(max_ptr + out, running_max, mask=mask_n)
    tl.store(sumexp_ptr + out, sumexp, mask=mask_n)
    tl.store(target_ptr + out, target_logit, mask=mask_n)
    if WITH_ENTROPY:
        tl.store(zdot_ptr + out, zdot, mask=mask_n)
    if WITH_LOGITS_MEAN:
        tl.store(zsum_ptr + out, zsum, mask=mask_n)
    if WITH_ARGMAX:
        tl.store(argmax_ptr + out, best, mask=mask_n)


def _combine(split_max, sumexp, zdot, zsum, argmax, target_logit, vocab, with_flags):
    """Merge [SPLITS, N] partials into the five per-token outputs."""
    with_argmax, with_entropy, with_logits_mean = with_flags
    token_max = split_max.max(dim=0).values                 # NaN if a split saw a NaN
    weights = torch.exp(split_max - token_max)              # NaN when every logit is -inf
    total = (sumexp * weights).sum(0)
    lse = token_max + torch.log(total)
    logprobs = target_logit.sum(0) - lse
    entropy = lse - (zdot * weights).sum(0) / total if with_entropy else None
    logits_mean = None
    if with_logits_mean:  # +inf logits sum to inf; the contract says NaN
        logits_mean = torch.where(lse.isnan(), float("nan"), zsum.sum(0) / vocab)
    best = None
    if with_argmax:
        # the first split with a NaN holds the first NaN; else ties resolve to the lowest
        # split, hence the lowest id
        nan_split = split_max.isnan()
        best_split = torch.where(nan_split.any(0), nan_split.int().argmax(dim=0),
                                 (split_max == token_max).int().argmax(dim=0))
        best = argmax.gather(0, best_split.unsqueeze(0)).squeeze(0)
    return logprobs, lse, best, entropy, logits_mean


def forward(hidden, weight, bias, rows, targets, *, temperature=1.0, softcap=None,
            with_argmax=False, with_entropy=False, with_logits_mean=False, num_splits=None,
            config=None):
    """hidden [M, H], weight [V, H], bias [V] | None, rows [N], targets [N] -> 5 x [N]."""
    _launch.check_inputs(hidden, weight, bias)
    bias, rows, targets = _launch.contiguous(bias, rows, targets)
    num_rows, vocab, width = rows.numel(), weight.shape[0], weight.shape[1]
    cfg = config or _launch.config(
        "fwd", hidden, (num_rows, vocab, width),
        lambda c: forward(hidden, weight, bias, rows, targets, temperature=temperature,
                          softcap=softcap, with_argmax=with_argmax, with_entropy=with_entropy,
                          with_logits_mean=with_logits_mean, num_splits=num_splits, config=c))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if num_rows == 0:
        empty = torch.zeros(0, **f32)
        return (empty, empty, rows.new_zeros(0) if with_argmax else None,
                empty if with_entropy else None, empty if with_logits_mean else None)
    token_tiles = triton.cdiv(num_rows, cfg["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = num_splits or _launch.vocab_splits(
        token_tiles, vocab_tiles, hidden.device, cfg["BLOCK_N"] * width * hidden.element_size())
    tiles_per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split starts inside V
    split_max, sumexp, target_logit = (torch.empty(splits, num_rows, **f32) for _ in range(3))
    zdot = torch.empty(splits, num_rows, **f32) if with_entropy else sumexp
    zsum = torch.empty(splits, num_rows, **f32) if with_logits_mean else sumexp
    argmax = torch.empty(splits, num_rows, dtype=torch.int64, device=hidden.device) \
        if with_argmax else rows
    _logprobs_fwd_kernel[(token_tiles * splits,)](
        hidden, weight, bias if bias is not None else weight, rows, targets,
        split_max, sumexp, zdot, zsum, argmax, target_logit,
        num_rows, vocab, width, tiles_per_split, splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=with_entropy, WITH_LOGITS_MEAN=with_logits_mean, WITH_ARGMAX=with_argmax,
        **_launch.dot_flags(hidden), **cfg)
    return _combine(split_max, sumexp, zdot, zsum, argmax, target_logit, vocab,
                    (with_argmax, with_entropy, with_logits_mean))
