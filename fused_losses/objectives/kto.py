"""KTO, Kahneman-Tversky Optimisation (``objectives.md`` §8): unpaired desirable and
undesirable completions, each judged against a reference point z, the policy's KL to the
reference estimated on mismatched prompt/completion pairs.

Per sequence, ``ρ = S − S^ref`` (summed log-probs; length-normalised with
``average_log_prob``) and ``z = sg(max(KL estimate, 0))``::

    desirable     λ_D · (1 − σ(β·(ρ − z)))
    undesirable   λ_U · (1 − σ(β·(z − ρ)))
    loss          mean over the B sequences

The estimate is TRL's: ``z = mean_j (S_j − S_j^ref)`` over a batch of mismatched pairs
(prompt j with another row's completion; :func:`mismatched_pairs` builds it), computed fused
under ``no_grad``. Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theory-Guided Optimization", §4 (Eq. 7 as TRL cites it); conventions of TRL's
``KTOTrainer`` and Liger's ``LigerFusedLinearKTOLoss``.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ._common import (IGNORE_INDEX, LOGITS_CHOSEN, LOGITS_REJECTED, LOGPS_CHOSEN,
                      LOGPS_REJECTED, REWARDS_CHOSEN, REWARDS_MARGINS, REWARDS_REJECTED,
                      LossOutput, check_bool, check_call, check_choice, check_positive,
                      check_range, fused_objective, masked_mean, present_mean,
                      reference_logprobs, sequence_logps, sequence_reference, shift_targets,
                      token_metrics)

# (ρ [B], z, β, desirable [B] bool) -> per-sequence loss [B], before the class weights.
UnpairedLoss = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]


def _kto(rho, z, beta, desirable):  # Ethayarajh et al. 2024, Eq. 7
    return torch.where(desirable, 1 - torch.sigmoid(beta * (rho - z)),
                       1 - torch.sigmoid(beta * (z - rho)))


def _apo_zero_unpaired(rho, z, beta, desirable):  # D'Oosterlinck et al. 2024, unpaired APO-zero
    return torch.where(desirable, 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho))


KTO_LOSSES: dict[str, UnpairedLoss] = {"kto": _kto, "apo_zero_unpaired": _apo_zero_unpaired}


def kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    preference_labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    kl_hidden: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    kl_ref_logprobs: torch.Tensor | None = None,
    kl_ref_hidden: torch.Tensor | None = None,
    ref_KL_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
    average_log_prob: bool = False,
    **primitive_options,
) -> LossOutput:
    """KTO on the fused LM head: ``mean_i λ_i·(1 − σ(±β·(ρ_i − z)))``.

    Args:
        hidden (Tensor): [B, T, H] final hidden states of prompt ⊕ completion (unshifted).
        weight (Tensor): [V, H] LM-head weight.
        labels (LongTensor): [B, T] Hugging Face labels, ``-100`` on prompt and padding.
        preference_labels (Tensor): [B] bool (or 0/1 integers): True = desirable.
        ref_logprobs (Tensor, optional): [B, T] reference log-probs, labels layout; or
            ``ref_hidden``/``ref_weight``/``ref_bias`` to compute them fused under
            ``no_grad``; or ``ref_logps``. One of the three is required.
        ref_logps (Tensor, optional): [B] TRL's precomputed per-sequence reference
            (``KTOTrainer``'s ``ref_logps`` column with ``precompute_ref_log_probs``): the
            reference's log-probs summed over each row's scored tokens (divided by the row's
            count here with ``average_log_prob``). Default: None.
        kl (float or Tensor, optional): the reference point z, given (a scalar, or [B] one per
            sequence, as Liger takes it); clamped at 0 and detached. Default: None.
        kl_hidden (Tensor, optional): [B', T', H] the policy's hidden states on mismatched
            prompt/completion pairs (:func:`mismatched_pairs`), with ``kl_labels`` [B', T']
            and the reference on them as ``kl_ref_logprobs`` [B', T'] (labels layout) or
            ``kl_ref_hidden`` [B', T', H] (with ``ref_weight``/``ref_bias``): z is TRL's
            estimate ``max(mean_j (S_j − S_j^ref), 0)``, computed fused under ``no_grad``
            with ``weight``. Without ``kl`` or ``kl_hidden``, z = 0 (as Liger without ``kl``;
            TRL always estimates it for ``"kto"``). Under DDP, average z over ranks
            yourself (TRL gathers it) and pass it as ``kl``. Default: None.
        ref_KL_logps (Tensor, optional): [B'] TRL's precomputed per-sequence reference on the
            mismatched batch (its ``ref_KL_logps`` column), summed like ``ref_logps``, in
            place of ``kl_ref_logprobs``/``kl_ref_hidden``. Default: None.
        beta (float): > 0. Default: 0.1.
        desirable_weight (float): >= 0, λ_D. Default: 1.0.
        undesirable_weight (float): >= 0, λ_U. Default: 1.0.
        loss_type (str): a key of ``KTO_LOSSES``: ``"kto"`` or ``"apo_zero_unpaired"``
            (``1 − σ(βρ)`` / ``σ(βρ)``, no z). Default: "kto".
        average_log_prob (bool): length-normalise S (and the estimate's S), as Liger's
            option; TRL sums. Default: False.
        **primitive_options: passed to :func:`linear_logprobs` (``bias``, ``backend``, ...);
            ``return_entropy=True`` adds the ``entropy`` metric. ``grad_in_forward`` (bool,
            optional): see :func:`~fused_losses.objectives._common.fused_objective`.

    Returns:
        LossOutput: loss; metrics as TRL names them: ``kl`` (z), ``rewards/chosen`` /
        ``rewards/rejected`` (mean β·ρ over desirable / undesirable sequences, 0 when there
        are none), ``rewards/margins`` (their difference), ``logps/chosen`` /
        ``logps/rejected``, ``logits/chosen`` / ``logits/rejected`` (mean logit over the
        vocabulary and the scored tokens).

    Paper: Ethayarajh et al. 2024, §4, Eq. 7.
    """
    check_call(kto_loss, hidden, labels, primitive_options)
    check_choice("loss_type", loss_type, KTO_LOSSES)
    check_positive("beta", beta)
    check_range("desirable_weight", desirable_weight, 0.0, math.inf)
    check_range("undesirable_weight", undesirable_weight, 0.0, math.inf)
    check_bool("average_log_prob", average_log_prob)
    desirable = _preferences(preference_labels, labels)
    # ref_weight scores ref_hidden, kl_ref_hidden or both: given for kl_ref_hidden alone it
    # is no per-token reference of the batch itself (ref_logps may then be the batch's).
    own_weight = None if ref_hidden is None and kl_ref_hidden is not None else ref_weight
    reference = sequence_reference(
        labels, average=average_log_prob, ref_logprobs=ref_logprobs, ref_hidden=ref_hidden,
        ref_weight=own_weight, ref_bias=ref_bias, ref_sequence_logps=ref_logps,
        sequence_name="ref_logps", **primitive_options)
    z = _reference_point(kl, kl_hidden, kl_labels, kl_ref_logprobs, kl_ref_hidden,
                         ref_KL_logps, weight, ref_weight, ref_bias, labels, average_log_prob,
                         primitive_options)
    class_weight = torch.where(desirable, *(torch.tensor(float(w), dtype=torch.float64,
                                                         device=labels.device)
                                            for w in (desirable_weight, undesirable_weight)))

    def rewards_of(stats):  # (S [B], ρ [B])
        policy = sequence_logps(stats.out.logprobs, stats.mask, average_log_prob)
        return policy, policy - reference.to(policy)

    def loss_from(stats, present):
        rho = rewards_of(stats)[1]
        losses = KTO_LOSSES[loss_type](rho, z.to(rho), beta, desirable)
        return present_mean(class_weight.to(rho) * losses, present)

    loss, stats = fused_objective(hidden, weight, labels, primitive_options, loss_from,
                                  groups="sequence", return_logits_mean=True)
    with torch.no_grad():
        policy, rho = rewards_of(stats)
        metrics = {"kl": z.to(rho).mean(), **_class_metrics(beta * rho, policy, desirable, stats),
                   **token_metrics(stats)}
    return LossOutput(loss, metrics)


@torch.no_grad()
def mismatched_pairs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch TRL estimates KTO's KL on: row i = prompt i ⊕ completion i−1 (row 0 takes the
    last row's completion), right-padded.

    A row's prompt is its attended tokens before the first scored label, its completion the
    attended tokens from there on (with their labels, so unscored tokens stay unscored).
    Run the policy and the reference on the result (no gradient needed) and pass the policy's
    hidden states as ``kl_hidden`` to :func:`kto_loss`.

    Args:
        input_ids (LongTensor): [B, T], B >= 2 (with one row the estimate would be the
            row's own reward).
        labels (LongTensor): [B, T] Hugging Face labels.
        attention_mask (Tensor, optional): [B, T]; padding is 0. Default: all ones.
        ignore_index (int): the labels' ignored id. Default: -100.
        pad_token_id (int): id written into the padding. Default: 0.

    Returns:
        (kl_input_ids [B, T'], kl_labels [B, T'], kl_attention_mask [B, T']).

    Source: TRL's ``KTOTrainer`` (completions rotated by one within the batch).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.shape[0] < 2:
        raise ValueError(f"input_ids must be [B, T] with B >= 2, got "
                         f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(getattr(labels, 'shape', ()))}")
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    if attended.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(attended.shape)}")
    scored = (labels != ignore_index) & attended
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    first = torch.where(scored, columns, input_ids.shape[1]).amin(-1, keepdim=True)
    in_prompt, in_completion = attended & (columns < first), attended & (columns >= first)
    pieces = []
    for row in range(input_ids.shape[0]):
        other = row - 1  # -1: the last row
        pieces.append((torch.cat((input_ids[row][in_prompt[row]],
                                  input_ids[other][in_completion[other]])),
                       torch.cat((torch.full_like(input_ids[row][in_prompt[row]], ignore_index),
                                  labels[other][in_completion[other]]))))
    width = max(len(ids) for ids, _ in pieces)
    kl_ids = input_ids.new_full((len(pieces), width), pad_token_id)
    kl_labels = labels.new_full((len(pieces), width), ignore_index)
    kl_mask = input_ids.new_zeros((len(pieces), width))
    for row, (ids, lab) in enumerate(pieces):
        kl_ids[row, :len(ids)], kl_labels[row, :len(ids)], kl_mask[row, :len(ids)] = ids, lab, 1
    return kl_ids, kl_labels, kl_mask


def _preferences(preference_labels, labels) -> torch.Tensor:
    rows = labels.shape[0]
    if not isinstance(preference_labels, torch.Tensor) or preference_labels.is_floating_point() \
            or tuple(preference_labels.shape) != (rows,):
        raise ValueError(f"preference_labels must be a bool (or 0/1 integer) tensor [B] = "
                         f"[{rows}], got "
                         f"{getattr(preference_labels, 'dtype', type(preference_labels).__name__)}"
                         f" of shape {tuple(getattr(preference_labels, 'shape', ()))}")
    if preference_labels.device != labels.device:
        raise ValueError(f"preference_labels is on {preference_labels.device}, expected "
                         f"{labels.device} (of labels)")
    return preference_labels != 0


def _reference_point(kl, kl_hidden, kl_labels, kl_ref_logprobs, kl_ref_hidden, ref_KL_logps,
                     weight, ref_weight, ref_bias, labels, average,
                     primitive_options) -> torch.Tensor:
    """z: given, or TRL's estimate on the mismatched batch; clamped at 0, detached; 0-d or
    [B]."""
    estimate = {"kl_hidden": kl_hidden, "kl_labels": kl_labels,
                "kl_ref_logprobs": kl_ref_logprobs, "kl_ref_hidden": kl_ref_hidden,
                "ref_KL_logps": ref_KL_logps}
    estimate_given = any(t is not None for t in estimate.values())
    if kl is not None and estimate_given:
        raise ValueError("pass either kl (the reference point) or kl_hidden/kl_labels (a "
                         "mismatched batch to estimate it on), not both")
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1 and tuple(kl.shape) != (labels.shape[0],):
                raise ValueError(f"kl must be a scalar or [B] = [{labels.shape[0]}], got shape "
                                 f"{tuple(kl.shape)}")
            z = kl.detach().to(labels.device, torch.float64)
            # a CPU value is checked as a number's is; an accelerator's is not (a host sync)
            if z.device.type == "cpu" and not torch.compiler.is_compiling() \
                    and not bool(torch.isfinite(z).all()):
                raise ValueError(f"kl must be finite, got {kl}")
            return (z.reshape(()) if z.numel() == 1 and z.dim() != 1 else z).clamp_min(0)
        check_range("kl", kl, -math.inf, math.inf)  # a number (NaN is refused)
        return torch.tensor(max(float(kl), 0.0), dtype=torch.float64, device=labels.device)
    if not estimate_given:
        return torch.zeros((), dtype=torch.float64, device=labels.device)
    if kl_hidden is None or kl_labels is None:
        raise ValueError("the estimate is taken on a mismatched batch: kl_hidden [B', T', H] "
                         "and kl_labels [B', T'] go together; got only "
                         + ", ".join(name for name, t in estimate.items() if t is not None))
    if not isinstance(kl_labels, torch.Tensor) or kl_labels.dim() != 2 \
            or kl_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kl_labels must be an integer tensor [B', T'], got "
                         f"{getattr(kl_labels, 'dtype', type(kl_labels).__name__)} of shape "
                         f"{tuple(getattr(kl_labels, 'shape', ()))}")
    references = [name for name in ("kl_ref_logprobs", "kl_ref_hidden", "ref_KL_logps")
                  if estimate[name] is not None]
    if len(references) != 1:
        raise ValueError("the estimate needs the reference on the mismatched batch: pass "
                         "exactly one of kl_ref_logprobs [B', T'], kl_ref_hidden [B', T', H] "
                         "and TRL's per-sequence ref_KL_logps [B'] (summed); got "
                         + (", ".join(references) or "none"))
    if kl_ref_hidden is not None and ref_weight is None:
        raise ValueError("kl_ref_hidden is scored with ref_weight (and ref_bias): pass "
                         "ref_weight [V, H]")
    reference = sequence_reference(
        kl_labels, average=average, ref_logprobs=kl_ref_logprobs, ref_hidden=kl_ref_hidden,
        ref_weight=None if kl_ref_hidden is None else ref_weight,
        ref_bias=None if kl_ref_hidden is None else ref_bias, ref_sequence_logps=ref_KL_logps,
        name="kl_ref", sequence_name="ref_KL_logps", **primitive_options)
    policy = reference_logprobs(kl_labels, ref_hidden=kl_hidden, ref_weight=weight,
                                ref_bias=primitive_options.get("bias"), name="kl",
                                **primitive_options)
    ignore_index = primitive_options.get("ignore_index", IGNORE_INDEX)
    mask = (shift_targets(kl_labels, ignore_index) != ignore_index).to(policy.dtype)
    gap = sequence_logps(policy, mask, average) - reference.to(policy)
    return gap.mean().double().clamp_min(0)


def _class_metrics(rewards, policy, desirable, stats) -> dict[str, torch.Tensor]:
    """TRL's per-class means (0 for a class absent from the batch: no host sync to skip it)."""
    chosen = desirable.to(rewards.dtype)
    rejected = 1 - chosen

    def mean(values, members):
        return (values * members).sum() / members.sum().clamp_min(1)

    means = stats.out.logits_mean
    metrics = {
        REWARDS_CHOSEN: mean(rewards, chosen), REWARDS_REJECTED: mean(rewards, rejected),
        LOGPS_CHOSEN: mean(policy, chosen), LOGPS_REJECTED: mean(policy, rejected),
        LOGITS_CHOSEN: masked_mean(means, stats.mask * chosen.unsqueeze(-1)),
        LOGITS_REJECTED: masked_mean(means, stats.mask * rejected.unsqueeze(-1)),
    }
    metrics[REWARDS_MARGINS] = metrics[REWARDS_CHOSEN] - metrics[REWARDS_REJECTED]
    return metrics
