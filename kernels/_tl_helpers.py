"""Triton device functions shared by the forward and backward kernels: written once here.

A logit tile is ``z = cap((hidden[rows] @ weight[offs_v].T + bias) * inv_temperature)``,
[BLOCK_N, BLOCK_V] in fp32, with ``cap(x) = softcap * tanh(x / softcap)`` when soft-capping.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no portable tanh across Triton 3.2-3.9; this form is exact to fp32 rounding.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32. The interpreter's bf16 dot is wrong; fp32 operands are exact
    there, so under it (DOT_FP32) the operands are upcast first."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr,      # [M, H], [V, H], [V]
    rows, offs_v, mask_n, mask_v,          # [BLOCK_N] int64 row ids, [BLOCK_V] int64 vocab ids
    H, stride_hm, stride_hh, stride_wv, stride_wh,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 logits; masked rows/columns hold finite junk, callers mask."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        offs_h = h_start + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        hidden_tile = tl.load(
            hidden_ptr + rows[:, None] * stride_hm + offs_h[None, :] * stride_hh,
            mask=mask_n[:, None] & mask_h[None, :], other=0.0)            # [BLOCK_N, BLOCK_H]
        weight_tile = tl.load(
            weight_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
            mask=mask_v[None, :] & mask_h[:, None], other=0.0)            # [BLOCK_H, BLOCK_V]
        acc = dot_acc(hidden_tile, weight_tile, acc, DOT_FP32, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temperature
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.jit
def grad_logits_tile(
    logits, offs_v, mask_n, mask_v,        # [BLOCK_N, BLOCK_V] fp32 capped logits
    targets, lse, grad_logprobs, grad_lse,  # [BLOCK_N] each
    grad_entropy, mu, grad_logits_mean,     # [BLOCK_N] each (read only when flagged)
    inv_vocab, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr,
):
    """dL/d(raw logits) of one tile, fp32, zero outside the masks (objectives.md, Notation):

    p * (g_lse - g_lp - g_ent * (z - mu)) + g_lp * onehot(y) + g_mean / V,
    then the soft-cap chain rule ``1 - (z/s)^2`` and ``1/temperature``.
    """
    probs = tl.exp(logits - lse[:, None])
    coef = grad_lse - grad_logprobs
    if WITH_ENTROPY_GRAD:
        grad = probs * (coef[:, None] - grad_entropy[:, None] * (logits - mu[:, None]))
    else:
        grad = probs * coef[:, None]
    grad += tl.where(offs_v[None, :] == targets[:, None], grad_logprobs[:, None], 0.0)
    if WITH_MEAN_GRAD:
        grad += grad_logits_mean[:, None] * inv_vocab
    if HAS_SOFTCAP:
        capped = logits / softcap
        grad = grad * (1.0 - capped * capped)
    grad = grad * inv_temperature
    return tl.where(mask_n[:, None] & mask_v[None, :], grad, 0.0)


@triton.jit
def grouped_tile(pid, token_tiles, vocab_tiles, GROUP_N: tl.constexpr):
    """(token tile, vocabulary tile) of program ``pid`` in grouped order (Triton matmul
    tutorial): GROUP_N token tiles run back to back on one vocabulary tile, so its weight rows
    come from L2 after the first."""
    per_group = GROUP_N * vocab_tiles
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(token_tiles - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_size, (pid % per_group) // group_size
