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

import difflib
import inspect
import math
from typing import Callable, Literal, NamedTuple

import torch

from ..primitive import (LogProbs, gradients_in_forward_available, linear_logprobs_loss,
                         next_token_targets, no_autocast)
from ..vocab_parallel import linear_logprobs

IGNORE_INDEX = -100

# What an objective's ``**primitive_options`` may hold: the primitive's keyword options,
# its ``bias``, and ``grad_in_forward`` (the objectives' choice of path, see
# :func:`fused_objective`). Read from the signature so a new primitive option passes at once.
PRIMITIVE_OPTIONS = frozenset(
    name for name, p in inspect.signature(linear_logprobs).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY) | {"bias", "grad_in_forward"}

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
    detached scalar tensors: call ``.item()`` on them when you log. A loss's own math never
    waits for the device; the primitive call inside it does, briefly: the scored-row
    compaction (a ``nonzero``, once per forward and once per backward) and, on the
    gradients-in-forward path with chunks of whole sequences or pairs, their boundaries
    (a ``.tolist()``). See the README, "torch.compile and host synchronisation".
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Argument checks: each error names the argument, what came and what was expected.
# ---------------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    """A real Python number (a ``bool`` is not one, though Python counts it as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def check_positive(name: str, value) -> None:
    """A finite number > 0 (``inf``, NaN and bools are refused)."""
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_range(name: str, value, low: float, high: float, *, closed: bool = False) -> None:
    """A finite ``low <= value < high`` (``<= high`` when ``closed``)."""
    inside = _is_number(value) and math.isfinite(value) and (
        low <= value <= high if closed else low <= value < high)
    if not inside:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}"
                         f"{']' if closed else ')'}, got {value!r}")


def check_count(name: str, value) -> None:
    """A loss divisor given by the caller (``num_items_in_batch``): None, a positive finite
    number, or a one-element real tensor. A CPU tensor's value is checked too; an
    accelerator's is not (that would be a host sync on every step)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a number or a one-element real tensor, got a "
                             f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value = value.item()
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite count (the number of scored items "
                         f"the summed loss is divided by), got {value!r}")


def check_options(function: str, options: dict, *, own: tuple[str, ...] = ()) -> None:
    """Every keyword an objective passes on to the primitive must be one of its options;
    anything else is a ``TypeError`` naming the public ``function`` (as Python's own is)."""
    unknown = [name for name in options if name not in PRIMITIVE_OPTIONS]
    if unknown:
        name = unknown[0]
        known = sorted(set(own) | PRIMITIVE_OPTIONS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint} "
                        f"(its options: {sorted(own)}; the primitive's, passed through: "
                        f"{sorted(PRIMITIVE_OPTIONS)})")
    ignore_index = options.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int (the label of unscored positions), got "
                        f"{ignore_index!r}")


def own_options(fn: Callable) -> tuple[str, ...]:
    """The keyword-only parameters of an objective (for :func:`check_options`' message)."""
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_call(fn: Callable, hidden, labels, primitive_options: dict, *,
               pairs: bool = False) -> None:
    """The checks every ``(hidden, weight, labels, **)`` objective starts with: its
    pass-through keywords, the labels against ``hidden``, and a preference batch's 2B rows."""
    check_options(fn.__name__, primitive_options, own=own_options(fn))
    check_labels(hidden, labels)
    if pairs:
        check_pairs(labels)


def resolve_alias(function: str, name: str, value, default, alias: str, alias_value):
    """``value`` of option ``name``, or of its alias (TRL's name for it) when that is given.

    Both given (``name`` away from its default) is a ``TypeError`` naming both.
    """
    if alias_value is None:
        return value
    if isinstance(value, bool) or value != default:  # True == 1.0, yet not a default
        raise TypeError(f"{function}() got both {name}={value!r} and {alias}={alias_value!r}; "
                        f"{alias} is TRL's name for {name}: pass one of them")
    return alias_value


def check_labels(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor [B, T], got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, T], got {tuple(labels.shape)}")
    check_hidden_rows(hidden, labels, "hidden")


def check_hidden_rows(hidden, labels: torch.Tensor, name: str) -> None:
    """``hidden`` (the argument called ``name``) is a ``[B, T, H]`` tensor over ``labels``'
    ``[B, T]``."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 \
            or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"{name} must have shape [B, T, H] = [{labels.shape[0]}, "
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

# [B, T] labels -> [B, T] int64 targets, ``targets[:, t] = labels[:, t+1]`` (last ignored):
# the primitive's one shifting rule, under the name the objectives use.
shift_targets = next_token_targets


def to_prediction_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] labels layout -> prediction layout: column t takes column t+1, the last is 0."""
    return torch.nn.functional.pad(values[:, 1:], (0, 1))


def to_labels_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] prediction layout -> labels layout: column t takes column t-1, column 0 is 0."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` is set, 0 elsewhere: ``where``, not a product, so a NaN or an
    inf at an ignored position (a reference log-prob, a reward) never reaches a loss or its
    gradient (``0 · nan`` is nan)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: the sum over scored positions."""
    return masked(values, mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A scalar: the mean over every scored position of the batch (0 when none is scored)."""
    return masked(values, mask).sum() / mask.sum().clamp_min(1)


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a [B] tensor; 0 for an empty batch (not 0/0). The count is a shape: no
    host sync."""
    return values.sum() / max(values.numel(), 1)


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
    In ``values``' dtype whatever autocast is on (autocast would run the block sums in
    bf16). Differentiable; ``gamma = 0`` gives ``values`` back.
    """
    with no_autocast(values.device):
        return _discounted_suffix_sum(values, gamma, block)


def _discounted_suffix_sum(values: torch.Tensor, gamma: float, block: int) -> torch.Tensor:
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
    An empty batch gives 0.
    """
    return torch.where(present, values, torch.zeros_like(values)).sum() / max(values.shape[0], 1)


def fused_objective(hidden, weight, labels, primitive_options: dict, loss_from: LossFrom, *,
                    groups: Literal["sequence", "pair", "token"], additive: bool = True,
                    targets=None,
                    **requests) -> tuple[torch.Tensor, TokenStats]:
    """An objective's loss and its (for metrics) per-token statistics, in one fused pass.

    Two paths, one ``loss_from``:

    * recompute: :func:`token_stats`, then ``loss_from(stats, every group)``; backward
      recomputes the logits (4 matmuls). Used when ``grad_in_forward=False`` is among
      ``primitive_options``, for a loss not ``additive`` over ``groups`` (a whole-batch
      statistic inside, e.g. ``bco_pair``'s δ), under vocabulary parallelism, under
      ``torch.compile``, when nothing needs a gradient, and where the backend has no
      gradients-in-forward path (``gradients_in_forward_available``).
    * gradient in forward (the default wherever the backend has it: every registered
      backend's one pass; or ``grad_in_forward=True``):
      :func:`linear_logprobs_loss` over chunks of whole groups (3 matmuls; dW is held from
      forward to backward and the loss can be backpropagated once). Each chunk's statistics
      are placed into zero [B, T] tensors and ``loss_from`` counts the groups present in it;
      detached copies are gathered so the returned TokenStats is the full batch's.

    ``loss_from`` runs with autocast off on both paths, as the primitive runs it.

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
        # loss_from runs with autocast off on both paths (the one pass runs it inside the
        # primitive, which turns autocast off), so both give the same loss under autocast.
        with no_autocast(hidden.device):
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
    with no_autocast(hidden.device):
        loss = loss + loss_from(TokenStats(zeros, mask, targets), shaped(empty))
    return loss, stats


def _grad_in_forward(requested, additive, hidden, weight, options) -> bool:
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"grad_in_forward must be None or a bool, got {requested!r}")
    if requested is False or not additive or options.get("process_group") is not None \
            or options.get("vocab_start") is not None or torch.compiler.is_compiling():
        return False
    if requested:
        return True
    bias = options.get("bias")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return needs_grad and gradients_in_forward_available(options.get("backend", "auto"),
                                                         hidden.device)


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
    ``no_grad``, with the policy's primitive options (its ``bias`` excepted). Ignored
    positions hold 0 whatever was passed there (NaN and inf included).
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
        check_per_token(f"{name}_logprobs", ref_logprobs, labels)
        ignore_index = primitive_options.get("ignore_index", IGNORE_INDEX)
        scored = shift_targets(labels, ignore_index) != ignore_index
        return masked(to_prediction_layout(ref_logprobs.detach()), scored)
    if ref_hidden is None or ref_weight is None:
        raise ValueError(f"{name}_hidden and {name}_weight go together; got only one of them")
    check_hidden_rows(ref_hidden, labels, f"{name}_hidden")
    options = {k: v for k, v in primitive_options.items()
               if k != "bias" and not k.startswith("return_")}
    with torch.no_grad():
        stats = token_stats(ref_hidden, ref_weight, labels, {**options, "bias": ref_bias})
    return stats.out.logprobs


def check_per_token(name: str, values, labels: torch.Tensor) -> None:
    """A per-token float input in the labels' layout (``ref_logprobs``, ``rewards``)."""
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != tuple(labels.shape):
        raise ValueError(f"{name} must have the shape of labels {tuple(labels.shape)} "
                         f"(a tensor), got {_shape_of(values)}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {values.dtype}")
    if values.device != labels.device:
        raise ValueError(f"{name} is on {values.device}; expected the device of labels "
                         f"({labels.device})")


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) \
        else f"a {type(value).__name__}"


def sequence_reference(labels, *, average: bool, ref_logprobs=None, ref_hidden=None,
                       ref_weight=None, ref_bias=None, ref_sequence_logps=None,
                       ref_chosen_logps=None, ref_rejected_logps=None, required=True,
                       name="ref", sequence_name=None, **primitive_options):
    """The reference's per-sequence log-probs [rows], detached: summed (``S^ref``) or
    length-normalised (``Ā^ref``, ``average``); or None when none is given and not
    ``required``.

    From per-token ``ref_logprobs``/``ref_hidden``... (see :func:`reference_logprobs`), or
    precomputed per sequence, as TRL stores them (``precompute_ref_log_probs``): summed over
    each row's scored tokens, either ``ref_sequence_logps [rows]`` or, for a preference batch,
    ``ref_chosen_logps [B]`` and ``ref_rejected_logps [B]`` (TRL's names; a preference loss
    takes only this form). A per-sequence sum is divided by the row's scored-token count
    when ``average``.

    Errors name the caller's arguments: ``name`` is the prefix of the per-token ones
    (``{name}_logprobs``, ``{name}_hidden``) and ``sequence_name`` the caller's name for
    ``ref_sequence_logps`` (KTO's ``ref_logps``, ``ref_KL_logps``); None for a preference
    loss.
    """
    per_sequence_form = f"{sequence_name} [B]" if sequence_name \
        else "ref_chosen_logps [B] and ref_rejected_logps [B]"
    ignore_index = primitive_options.get("ignore_index", IGNORE_INDEX)
    mask = (shift_targets(labels, ignore_index) != ignore_index)
    pairs = ref_chosen_logps is not None or ref_rejected_logps is not None
    per_token = any(t is not None for t in (ref_logprobs, ref_hidden, ref_weight))
    if pairs:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("ref_chosen_logps and ref_rejected_logps go together; got only "
                             f"{'ref_chosen_logps' if ref_rejected_logps is None else 'ref_rejected_logps'}")
        half = labels.shape[0] // 2
        for pair_name, t in (("ref_chosen_logps", ref_chosen_logps),
                             ("ref_rejected_logps", ref_rejected_logps)):
            check_per_sequence(pair_name, t, half, labels.device)
        ref_sequence_logps = torch.cat((ref_chosen_logps, ref_rejected_logps))
        sequence_name = "ref_chosen_logps/ref_rejected_logps"
    elif ref_sequence_logps is not None:
        check_per_sequence(sequence_name, ref_sequence_logps, labels.shape[0], labels.device)
    if ref_sequence_logps is not None:
        if per_token:
            raise ValueError(f"pass a per-token reference ({name}_logprobs or {name}_hidden/"
                             f"ref_weight) or a per-sequence one ({sequence_name}), not both")
        count = mask.sum(-1)
        total = masked(ref_sequence_logps.detach(), count > 0)  # a row with nothing scored: 0
        return total / count.clamp_min(1).to(total.dtype) if average else total
    ref = reference_logprobs(labels, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
                             ref_weight=ref_weight, ref_bias=ref_bias, required=False,
                             name=name, **primitive_options)
    if ref is None:
        if required:
            raise ValueError(f"this loss needs a reference: pass {name}_logprobs [B, T] "
                             f"(labels layout), {name}_hidden [B, T, H] with ref_weight [V, H], "
                             f"or TRL's per-sequence {per_sequence_form} (summed log-probs)")
        return None
    return sequence_logps(ref, mask.to(ref.dtype), average)


def check_per_sequence(name: str, values, rows: int, device) -> None:
    """A per-sequence float input, [rows]."""
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (rows,):
        raise ValueError(f"{name} must be a tensor of shape [{rows}] (one value per "
                         f"sequence), got {_shape_of(values)}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {values.dtype}")
    if values.device != device:
        raise ValueError(f"{name} is on {values.device}; expected the device of labels "
                         f"({device})")


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps,
                 stats: TokenStats | None = None) -> dict[str, torch.Tensor]:
    """TRL's preference metrics from [B] tensors; ``logits/*`` when ``logits_mean`` came back."""
    r_w, r_l = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        REWARDS_CHOSEN: batch_mean(r_w),
        REWARDS_REJECTED: batch_mean(r_l),
        REWARDS_ACCURACIES: batch_mean((r_w > r_l).to(r_w.dtype)),
        REWARDS_MARGINS: batch_mean(r_w - r_l),
        LOGPS_CHOSEN: batch_mean(chosen_logps.detach()),
        LOGPS_REJECTED: batch_mean(rejected_logps.detach()),
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
