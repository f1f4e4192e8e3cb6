"""Triton device functions shared by the forward and backward kernels: written once here.

A logit tile is ``z = cap((hidden[rows] @ weight[offs_v].T + bias) * inv_temperature)``,
[BLOCK_N, BLOCK_V] in fp32, with ``cap(x) = softcap * tanh(x / softcap)`` when soft-capping.
Every product of an index with a stride is int64: a transposed ``[H, V]`` head passed as
``P.T`` has ``stride_wh = V``, and ``H * V`` passes 2**31 at H = 8192, V = 262144.
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
        offs_h = (h_start + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask_h = offs_h < H
        hidden_tile = tl.load(
            hidden_ptr + rows[:, None] * stride_hm + offs_h[None, :] * stride_hh,
            mask=mask_n[:, None] & mask_h[None, :], other=0.0)            # [BLOCK_N, BLOCK_H]
        weight_tile = tl.load(
            weight_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
            mask=mask_v[None, :] & mask_h[:, None], other=0.0)            # [BLOCK_H, BLOCK_V]
        acc = dot_acc(hidden_tile, weight_tile, acc, DOT_FP32, DOT_PRECISION)
    return finish_logits(acc, bias_ptr, offs_v, mask_v, inv_temperature, softcap, HAS_BIAS,
                         HAS_SOFTCAP)


@triton.jit
def finish_logits(acc, bias_ptr, offs_v, mask_v, inv_temperature, softcap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Raw fp32 products ``[BLOCK_N, BLOCK_V]`` -> logits: ``+ bias``, ``* inv_temperature``,
    then the soft-cap."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temperature
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.jit
def load_grad_stats(offs_n, mask_n, targets_ptr, lse_ptr, grad_logprobs_ptr, grad_lse_ptr,
                    grad_entropy_ptr, mu_ptr, grad_logits_mean_ptr,
                    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr):
    """The per-token inputs of :func:`grad_logits_tile` for rows ``offs_n``: (targets int64,
    lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean); the flagged-off ones
    are placeholders never read. Masked rows get target -1 (no column matches) and zeros."""
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_logprobs = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad_entropy = lse
    mu = lse
    grad_logits_mean = lse
    if WITH_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        mu = tl.load(mu_ptr + offs_n, mask=mask_n, other=0.0)
    if WITH_MEAN_GRAD:
        grad_logits_mean = tl.load(grad_logits_mean_ptr + offs_n, mask=mask_n, other=0.0)
    return targets, lse, grad_logprobs, grad_lse, grad_entropy, mu, grad_logits_mean


@triton.jit
def grad_logits_tile(
    logits, offs_v, mask_n, mask_v,        # [BLOCK_N, BLOCK_V] fp32 capped logits
    targets, lse, grad_logprobs, grad_lse,  # [BLOCK_N] each
    grad_entropy, mu, grad_logits_mean,     # [BLOCK_N] each (read only when flagged)
    inv_vocab, inv_temperature, softcap, filter_eps,
    HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr,
    FILTER: tl.constexpr,
):
    """dL/d(raw logits) of one tile, fp32, zero outside the masks (objectives.md, Notation):

    p * (g_lse - g_lp - g_ent * (z - mu)) + g_lp * onehot(y) + g_mean / V,
    then the soft-cap chain rule ``1 - (z/s)^2`` and ``1/temperature``. With ``FILTER`` the
    softmax terms are dropped where ``p < filter_eps`` (``fused_losses.backends``).
    A NaN ``lse`` (a row with a NaN or +inf logit) makes the whole row NaN.
    """
    probs = tl.exp(logits - lse[:, None])
    coef = grad_lse - grad_logprobs
    if WITH_ENTROPY_GRAD:
        # at a -inf logit p = 0 and z - mu = -inf: its term is 0, not 0 * inf = NaN
        soft = tl.where(probs == 0.0, 0.0,
                        probs * (coef[:, None] - grad_entropy[:, None] * (logits - mu[:, None])))
    else:
        soft = probs * coef[:, None]
    if FILTER:
        # p itself is compared, not the scaled gradient; NaN < eps is false: NaN survives
        soft = tl.where(probs < filter_eps, 0.0, soft)
    grad = soft + tl.where(offs_v[None, :] == targets[:, None], grad_logprobs[:, None], 0.0)
    if WITH_MEAN_GRAD:
        grad += grad_logits_mean[:, None] * inv_vocab
    if HAS_SOFTCAP:
        capped = logits / softcap
        grad = grad * (1.0 - capped * capped)
    grad = grad * inv_temperature
    return tl.where(mask_n[:, None] & mask_v[None, :], grad, 0.0)


@triton.jit
def grouped_tile(pid, grouped_tiles, other_tiles, GROUP: tl.constexpr):
    """(grouped-axis tile, other-axis tile) of program ``pid`` of a 1-D grid over
    ``grouped_tiles x other_tiles`` output tiles, in grouped order (Triton's matmul
    tutorial): ``GROUP`` consecutive tiles of the grouped axis (fewer in the last group) run
    back to back on each tile of the other axis, grouped axis fastest. The programs resident
    at once then share ``GROUP`` operand slabs of the grouped axis, which stay in L2 across
    the group, and each slab of the other axis is read from HBM about once per group
    instead of once per grouped-axis tile. Callers: (token tile, vocabulary tile) in the
    logit-tile kernels, (token tile, H tile) in the dH GEMM, (vocabulary tile, H tile) in
    the dW GEMM."""
    per_group = GROUP * other_tiles
    first = (pid // per_group) * GROUP
    group_size = tl.minimum(grouped_tiles - first, GROUP)
    return first + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def online_update(
    logits, offs_v, mask_v, tile_start, targets, V,  # [BLOCK_N, BLOCK_V] fp32 logit tile
    running_max, sumexp, zdot, zsum, best, first_nan, target_logit,  # [BLOCK_N] each
    WITH_ENTROPY: tl.constexpr, WITH_LOGITS_MEAN: tl.constexpr, WITH_ARGMAX: tl.constexpr,
):
    """Merge one logit tile (vocabulary ids ``offs_v``, the first ``tile_start``) into its rows'
    online statistics: running max ``m``, ``sum exp(z - m)``, ``sum exp(z - m) * z``,
    ``sum z``, argmax, first NaN id (``V``: none) and target logit. Returns them updated.

    Non-finite logits follow ``fused_losses.backends``: ``-inf`` weighs 0 (the exponent is
    taken against 0 while a row has seen only ``-inf``, never ``-inf - -inf``); NaN or ``+inf``
    makes ``sumexp`` NaN (``exp(NaN - m)``, ``exp(inf - inf)``) whatever a GPU's max does with
    NaN; NaN is tracked on its own for the argmax (GPUs skip NaN in argmax, the interpreter
    refuses an all-NaN row), and strict ``>`` keeps the first maximum, as ``torch.argmax``.
    """
    logits_or_ninf = tl.where(mask_v[None, :], logits, float("-inf"))
    logits_or_zero = tl.where(mask_v[None, :], logits, 0.0)
    tile_max = tl.max(logits_or_ninf, axis=1)
    new_max = tl.maximum(running_max, tile_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    probs = tl.exp(logits_or_ninf - shift[:, None])          # 0 on masked columns
    sumexp = sumexp * rescale + tl.sum(probs, axis=1)
    if WITH_ENTROPY:
        # p * z with p = 0 at a -inf logit is 0, not NaN
        zdot = zdot * rescale + tl.sum(tl.where(probs == 0.0, 0.0, probs * logits_or_zero),
                                       axis=1)
    if WITH_LOGITS_MEAN:
        zsum += tl.sum(logits_or_zero, axis=1)
    if WITH_ARGMAX:
        is_nan = logits_or_ninf != logits_or_ninf
        tile_arg = tile_start + tl.argmax(tl.where(is_nan, float("-inf"), logits_or_ninf),
                                          axis=1).to(tl.int64)
        best = tl.where(tile_max > running_max, tile_arg, best)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, offs_v[None, :], V), axis=1))
    hit = offs_v[None, :] == targets[:, None]
    target_logit += tl.sum(tl.where(hit, logits_or_zero, 0.0), axis=1)
    return new_max, sumexp, zdot, zsum, best, first_nan, target_logit


@triton.jit
def store_online_state(
    slot, mask_n, V,                                                  # [BLOCK_N] int64 offsets
    running_max, sumexp, zdot, zsum, best, first_nan, target_logit,  # [BLOCK_N] each
    max_ptr, sumexp_ptr, zdot_ptr, zsum_ptr, argmax_ptr, target_ptr,
    WITH_ENTROPY: tl.constexpr, WITH_LOGITS_MEAN: tl.constexpr, WITH_ARGMAX: tl.constexpr,
):
    """Store the statistics of :func:`online_update` at ``slot``. With the argmax, a row that
    saw a NaN stores its first NaN as the argmax and NaN as its max, so whoever merges the
    partials (or continues them) sees the NaN whatever a GPU's max did with it."""
    if WITH_ARGMAX:
        has_nan = first_nan < V
        best = tl.where(has_nan, first_nan, best)
        running_max = tl.where(has_nan, float("nan"), running_max)
    tl.store(max_ptr + slot, running_max, mask=mask_n)
    tl.store(sumexp_ptr + slot, sumexp, mask=mask_n)
    tl.store(target_ptr + slot, target_logit, mask=mask_n)
    if WITH_ENTROPY:
        tl.store(zdot_ptr + slot, zdot, mask=mask_n)
    if WITH_LOGITS_MEAN:
        tl.store(zsum_ptr + slot, zsum, mask=mask_n)
    if WITH_ARGMAX:
        tl.store(argmax_ptr + slot, best, mask=mask_n)
