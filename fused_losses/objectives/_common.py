"""Steps every objective shares, written once.

Layouts. Labels are Hugging Face style: ``labels [B, T]`` aligned with ``input_ids``, with
``ignore_index`` on prompt and padding; ``hidden[:, t]`` predicts ``labels[:, t+1]``. The
objectives call the primitive on the *unshifted* hidden states with shifted targets
(``targets[:, t] = labels[:, t+1]``, last column ignored), so ``hidden`` is never copied and
the per-token outputs come back in the *prediction layout*: column t is about the token
``labels[:, t+1]``. Reference log-probs arrive in the *labels layout* (column t is about
``labels[:, t]``; column 0 is always 0) and are moved to the prediction layout here.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

from ..backends import resolve_backend
from ..primitive import LogProbs, linear_logprobs_loss
from ..vocab_parallel import linear_logprobs

IGNORE_INDEX = -100

# Metric names, as TRL names them.
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
LOGITS_CHOSEN = "logits/chosen"
LOGITS_REJECTED = "logits/rejected"
NLL_LOSS = "nll_loss"


class LossOutput(NamedTuple):
    """What every objective returns.

    ``loss`` is a differentiable scalar; ``metrics`` maps names (TRL's where TRL has one) to
    detached scalar tensors. No host synchronisation happens inside a loss: call ``.item()``
    on the metrics when you log them.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Argument checks: each error names the argument, what came and what was expected.
# ---------------------------------------------------------------------------------------------

def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_range(name: str, value, low: float, high: float, *, closed: bool = False) -> None:
    """``low <= value < high`` (``<= high`` when ``closed``)."""
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low <= value <= high if closed else low <= value < high)
    if not inside:
        raise ValueError(f"{name} must be a number in [{low}, {high}{']' if closed else ')'}, "
                         f"got {value!r}")


def check_labels(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor [B, T], got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, T], got {tuple(labels.shape)}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 \
            or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"hidden must have shape [B, T, H] = [{labels.shape[0]}, "
                         f"{labels.shape[1]}, H] to match labels, got "
                         f"{tuple(getattr(hidden, 'shape', ()))}")


def check_pairs(labels: torch.Tensor) -> int:
    """The number of pairs B of a preference batch laid out chosen rows first, then rejected."""
    rows = labels.shape[0]
    if rows % 2:
        raise ValueError(f"a preference loss needs 2B rows (B chosen, then B rejected); labels "
                         f"has {rows} rows (shape {tuple(labels.shape)}), an odd number")
    return rows // 2


# ---------------------------------------------------------------------------------------------
# Shifting and sequence sums
# ---------------------------------------------------------------------------------------------

def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets with ``targets[:, t] = labels[:, t+1]`` (last ignored)."""
    targets = torch.full_like(labels, ignore_index, dtype=torch.long)
    targets[:, :-1] = labels[:, 1:]
    return targets


def to_prediction_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] labels layout -> prediction layout: column t takes column t+1, the last is 0."""
    return torch.nn.functional.pad(values[:, 1:], (0, 1))


def to_labels_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] prediction layout -> labels layout: column t takes column t-1, column 0 is 0."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: the sum over scored positions."""
    return (values * mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A scalar: the mean over every scored position of the batch (0 when none is scored)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sequence_logps(logprobs: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """[B, T] per-token log-probs -> [B] summed (``S``) or length-normalised (``Ā``)."""
    total = masked_sum(logprobs, mask)
    return total / mask.sum(-1).clamp_min(1) if average else total


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] -> (chosen [B, ...], rejected [B, ...])."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def discounted_suffix_sum(values: torch.Tensor, gamma: float, block: int = 128) -> torch.Tensor:
    """``out[:, t] = Σ_{j ≥ t} gamma^(j-t) · values[:, j]`` over the last dim; [B, T] -> [B, T].

    Exact for any ``gamma`` in [0, 1] and any length: each block of ``block`` positions is
    summed with a [block, block] matrix of powers and the sum of the block after it is
    carried backwards (no ``gamma^-t`` rescaling, which underflows on long sequences).
    Differentiable; ``gamma = 0`` gives ``values`` back.
    """
    length = values.shape[-1]
    size = max(1, min(block, length))
    pos = torch.arange(size, device=values.device)
    steps = (pos.unsqueeze(0) - pos.unsqueeze(1)).to(values.dtype)  # [t, j] = j - t
    base = torch.full_like(steps, float(gamma))
    powers = torch.where(steps >= 0, base.pow(steps.clamp_min(0)), torch.zeros_like(steps))
    pieces, carry = [], None
    for start in reversed(range(0, length, size)):
        chunk = values[..., start:start + size]
        width = chunk.shape[-1]
        local = chunk @ powers[:width, :width].T
        if carry is not None:  # the next block's first sum, discounted by its distance
            reach = torch.arange(width, 0, -1, device=values.device).to(values.dtype)
            local = local + carry.unsqueeze(-1) * base[0, :width].pow(reach)
        carry = local[..., 0]
        pieces.append(local)
    return torch.cat(pieces[::-1], dim=-1)


# ---------------------------------------------------------------------------------------------
# Stable scalar helpers
# ---------------------------------------------------------------------------------------------

def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for x > 0, accurate at both ends (Mächler, 2012)."""
    return torch.where(x > math.log(2.0), torch.log1p(-torch.exp(-x)),
                       torch.log(-torch.expm1(-x)))


# ---------------------------------------------------------------------------------------------
# The primitive call and the reference
# ---------------------------------------------------------------------------------------------

class TokenStats(NamedTuple):
    """Per-token outputs in the prediction layout, [B, T] each, and the scored mask."""

    out: LogProbs
    mask: torch.Tensor  # float, 1 where targets[:, t] is scored
    targets: torch.Tensor  # long, what the primitive was asked to score


def token_stats(hidden, weight, labels, primitive_options: dict, *, targets=None,
                **requests) -> TokenStats:
    """One primitive call on the unshifted ``hidden`` with shifted targets.

    ``requests`` are the outputs the loss itself needs (``return_lse=True`` ...); they are
    OR-ed with the caller's ``return_*`` options, so a caller may ask for more (e.g.
    ``return_entropy=True`` for the ``entropy`` metric) without a clash. ``targets``
    overrides the shifted labels (e.g. with dummy ids where only the lse is wanted); the mask
    always follows the shifted labels. ``grad_in_forward`` (an objective-level option, see
    :func:`fused_objective`) is ignored here: this call always recomputes in backward.
    """
    options, targets, mask_of = _requested(labels, primitive_options, targets, requests)
    options.pop("grad_in_forward", None)
    out = linear_logprobs(hidden, weight, targets, **options)
    return TokenStats(out, mask_of(out.logprobs.dtype), targets)


def _requested(labels, primitive_options, targets, requests):
    """(options with ``requests`` OR-ed in, the targets, ``dtype -> scored mask``)."""
    ignore_index = primitive_options.get("ignore_index", IGNORE_INDEX)
    shifted = shift_targets(labels, ignore_index)
    options = dict(primitive_options)
    for name, wanted in requests.items():
        options[name] = bool(options.get(name, False)) or wanted
    targets = shifted if targets is None else targets
    return options, targets, lambda dtype: (shifted != ignore_index).to(dtype)


# ``loss_from(stats, present) -> scalar``: an objective's loss, written once on full-size
# TokenStats ([B, T] per token) and a bool mask ``present`` of the groups (sequences,
# pairs, or tokens as [B, T]) to count. Per-group terms are masked with ``present`` (``present_mean``) and
# divided by the FULL batch's normaliser, so the sum over chunks of whole groups is the loss.
# Rows outside the counted groups hold zeros, so a term that vanishes at zero statistics
# (a token-mean NLL, REINFORCE's logp·G) needs no mask.
LossFrom = Callable[[TokenStats, torch.Tensor], torch.Tensor]


def present_mean(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``Σ_{present} values / len(values)``: a mean over every group, counting only these.

    ``where``, not a product: an absent group's value may be anything finite at zero stats.
    """
    return torch.where(present, values, torch.zeros_like(values)).sum() / values.shape[0]


def fused_objective(hidden, weight, labels, primitive_options: dict, loss_from: LossFrom, *,
                    groups: Literal["sequence", "pair", "token"], additive: bool = True,
                    targets=None,
                    **requests) -> tuple[torch.Tensor, TokenStats]:
    """An objective's loss and its (for metrics) per-token statistics, in one fused pass.

    Two paths, one ``loss_from``:

    * recompute: :func:`token_stats`, then ``loss_from(stats, every group)``; backward
      recomputes the logits (4 matmuls). Used with the Triton backend, when
      ``grad_in_forward=False`` is among ``primitive_options``, for a loss not ``additive``
      over ``groups`` (a whole-batch statistic inside, e.g. ``bco_pair``'s δ), under
      vocabulary parallelism and when nothing needs a gradient.
    * gradient in forward (default on the torch backend, or ``grad_in_forward=True``):
      :func:`linear_logprobs_loss` over chunks of whole groups (3 matmuls; dW is held from
      forward to backward and the loss can be backpropagated once). Each chunk's statistics
      are placed into zero [B, T] tensors and ``loss_from`` counts the groups present in it;
      detached copies are gathered so the returned TokenStats is the full batch's.

    Args:
        loss_from (callable): ``(TokenStats, BoolTensor [groups]) -> scalar`` (see
            ``LossFrom``).
        groups (str): ``"sequence"`` (a row of ``labels``), ``"pair"`` (rows k and B+k) or
            ``"token"`` (each position: chunks of any size, so a loss additive over tokens
            keeps the 3-matmul path however long its sequences; ``present`` is then [B, T]).
        additive (bool): the loss is a sum of per-group terms with normalisers known before
            the pass. Default: True.
        targets, requests: as in :func:`token_stats`.

    Returns:
        (loss, TokenStats): the stats are detached on the gradient-in-forward path.
    """
    check_choice("groups", groups, ("sequence", "pair", "token"))
    options, targets, mask_of = _requested(labels, primitive_options, targets, requests)
    requested = options.pop("grad_in_forward", None)
    rows, length = labels.shape
    if groups == "token":
        group_of = torch.arange(rows * length, device=labels.device).view(rows, length)
        num_groups = rows * length
    else:
        group_of = torch.arange(rows, device=labels.device).unsqueeze(1).expand(rows, length)
        num_groups = rows if groups == "sequence" else rows // 2
    if groups == "pair":
        group_of = group_of % num_groups

    def shaped(present):  # what loss_from gets: [groups], or [B, T] for tokens
        return present.view(rows, length) if groups == "token" else present

    if not _grad_in_forward(requested, additive, hidden, weight, options):
        stats = token_stats(hidden, weight, labels, options, targets=targets)
        every = torch.ones(num_groups, dtype=torch.bool, device=labels.device)
        return loss_from(stats, shaped(every)), stats

    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ignore_index = options.get("ignore_index", IGNORE_INDEX)
    mask, size, flat_groups = mask_of(dtype), rows * length, group_of.reshape(-1)
    kept = (True, options.pop("return_lse", False), options.get("return_argmax", False),
            options.get("return_entropy", False), options.get("return_logits_mean", False))
    gathered = [None if not keep else hidden.new_full((size,), ignore_index, dtype=torch.long)
                if i == 2 else hidden.new_zeros(size, dtype=dtype)
                for i, keep in enumerate(kept)]

    def chunk_loss(chunk: LogProbs, positions: torch.Tensor) -> torch.Tensor:
        for full, part in zip(gathered, chunk):
            if full is not None:
                full.index_copy_(0, positions, part.detach())
        placed = LogProbs(*(None if full is None or not part.is_floating_point()
                            else part.new_zeros(size).index_copy(0, positions, part)
                            .view(rows, length) for full, part in zip(gathered, chunk)))
        present = torch.zeros(num_groups, dtype=torch.bool, device=labels.device)
        present[flat_groups.index_select(0, positions)] = True
        return loss_from(TokenStats(placed, mask, targets), shaped(present))

    for name in ("deterministic", "process_group", "vocab_start"):  # False/None here
        options.pop(name, None)
    loss = linear_logprobs_loss(hidden, weight, targets, chunk_loss, options.pop("bias", None),
                                groups=None if groups == "token" else group_of, **options)
    stats = TokenStats(LogProbs(*(None if full is None else full.view(rows, length)
                                  for full in gathered)), mask, targets)
    # A group with no scored token is in no chunk; the recompute path counts its term at
    # zero statistics (a constant), so it is added here (exactly 0 when there is none; no
    # host sync to find out).
    scored = (targets.reshape(-1) != ignore_index).long()
    empty = torch.zeros(num_groups, dtype=torch.long, device=labels.device) \
        .index_add_(0, flat_groups, scored) == 0
    zeros = LogProbs(*(None if full is None or i == 2 else torch.zeros_like(full)
                       for i, full in enumerate(stats.out)))
    loss = loss + loss_from(TokenStats(zeros, mask, targets), shaped(empty))
    return loss, stats


def _grad_in_forward(requested, additive, hidden, weight, options) -> bool:
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"grad_in_forward must be None or a bool, got {requested!r}")
    if requested is False or not additive or options.get("process_group") is not None \
            or options.get("vocab_start") is not None:
        return False
    if requested:
        return True
    bias = options.get("bias")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return needs_grad and hasattr(resolve_backend(options.get("backend", "auto"),
                                                  hidden.device), "forward_backward")


def token_metrics(stats: TokenStats) -> dict[str, torch.Tensor]:
    """TRL's ``mean_token_accuracy`` and ``entropy`` over the scored tokens, when the caller
    asked the primitive for ``return_argmax`` / ``return_entropy`` (cheap: no extra pass)."""
    metrics = {}
    if stats.out.argmax is not None:
        hits = (stats.out.argmax == stats.targets).to(stats.mask.dtype)
        metrics["mean_token_accuracy"] = masked_mean(hits, stats.mask)
    if stats.out.entropy is not None:
        metrics["entropy"] = masked_mean(stats.out.entropy.detach(), stats.mask)
    return metrics


def reference_logprobs(labels, *, ref_logprobs=None, ref_hidden=None, ref_weight=None,
                       ref_bias=None, required=True, name="ref", **primitive_options):
    """The reference's per-token log-probs in the *prediction* layout, detached; or None.

    Takes precomputed ``ref_logprobs [B, T]`` (labels layout) or computes them from
    ``ref_hidden [B, T, H]``/``ref_weight [V, H]`` (and ``ref_bias``) with the primitive under
    ``no_grad``, with the policy's primitive options (its ``bias`` excepted).
    """
    given = ref_logprobs is not None
    computed = ref_hidden is not None or ref_weight is not None
    if given and computed:
        raise ValueError(f"pass either {name}_logprobs or {name}_hidden/{name}_weight, not both")
    if not given and not computed:
        if required:
            raise ValueError(f"this loss needs a reference: pass {name}_logprobs [B, T] "
                             f"(labels layout) or {name}_hidden [B, T, H] and {name}_weight [V, H]")
        return None
    if given:
        if not isinstance(ref_logprobs, torch.Tensor) \
                or tuple(ref_logprobs.shape) != tuple(labels.shape):
            raise ValueError(f"{name}_logprobs must have the shape of labels "
                             f"{tuple(labels.shape)}, got "
                             f"{tuple(getattr(ref_logprobs, 'shape', ()))}")
        return to_prediction_layout(ref_logprobs.detach())
    if ref_hidden is None or ref_weight is None:
        raise ValueError(f"{name}_hidden and {name}_weight go together; got only one of them")
    if ref_hidden.dim() != 3 or tuple(ref_hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"{name}_hidden must have shape [B, T, H] with [B, T] = "
                         f"{tuple(labels.shape)} (labels), got {tuple(ref_hidden.shape)}")
    options = {k: v for k, v in primitive_options.items()
               if k != "bias" and not k.startswith("return_")}
    with torch.no_grad():
        stats = token_stats(ref_hidden, ref_weight, labels, {**options, "bias": ref_bias})
    return stats.out.logprobs


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps,
                 stats: TokenStats | None = None) -> dict[str, torch.Tensor]:
    """TRL's preference metrics from [B] tensors; ``logits/*`` when ``logits_mean`` came back."""
    r_w, r_l = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        REWARDS_CHOSEN: r_w.mean(),
        REWARDS_REJECTED: r_l.mean(),
        REWARDS_ACCURACIES: (r_w > r_l).to(r_w.dtype).mean(),
        REWARDS_MARGINS: (r_w - r_l).mean(),
        LOGPS_CHOSEN: chosen_logps.detach().mean(),
        LOGPS_REJECTED: rejected_logps.detach().mean(),
    }
    if stats is not None and stats.out.logits_mean is not None:
        means, masks = split_pairs(stats.out.logits_mean.detach()), split_pairs(stats.mask)
        metrics[LOGITS_CHOSEN] = masked_mean(means[0], masks[0])
        metrics[LOGITS_REJECTED] = masked_mean(means[1], masks[1])
    if stats is not None:
        metrics.update(token_metrics(stats))
    return metrics


def chosen_nll(stats: TokenStats) -> torch.Tensor:
    """Token-mean NLL over the chosen rows (the first half): the RPO/CPO/ORPO SFT term."""
    logprobs, mask = split_pairs(stats.out.logprobs)[0], split_pairs(stats.mask)[0]
    return -masked_mean(logprobs, mask)
