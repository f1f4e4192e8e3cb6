"""TRL's fused-LM-head protocol served by our kernels.

TRL >= 1.16 computes its DPO, KTO, GRPO, RLOO and SFT losses from
``model(..., labels=labels, fused_lm_head=True)``, which returns per-token fields instead of
``[B, T, V]`` logits (``trl.trainer.utils.add_fused_lm_head``). A model patched with
:func:`fused_losses.patch_causal_lm` answers that call from :func:`fused_losses.linear_logprobs`
inside its own forward, whether TRL's head was added before or after the patch.

Field by field (each ``[B, T - 1]``, or ``[B, T]`` with ``shift_labels``; 0 where the label
is ignored), with ``z`` the temperature-scaled logits:

* ``log_probs`` = ``log softmax(z)[label]`` and ``entropy`` = ``H(softmax(z))``: the
  primitive's ``logprobs`` and ``entropy``, differentiable.
* ``mean_logits`` = ``mean_v z``: the primitive's ``logits_mean``, detached.
* ``is_top1`` = ``argmax_v z == label`` (first maximum on ties): from the primitive's argmax.
* ``log_sum_sq_probs`` = ``log sum_v p_v^2 = LSE(2z) - 2 LSE(z)``, detached. ``LSE(2z)`` is
  the log-sum-exp of the same head at half the temperature (and twice the soft-cap), so it
  costs a second forward pass over the vocabulary (no backward): computed only when asked.
* ``loss`` = ``-sum log_probs / (num_items_in_batch or the number of scored labels)``, plus
  the MoE load-balancing loss weighted by ``router_aux_loss_coef`` when the model returns one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..vocab_parallel import linear_logprobs
from ..cross_entropy import check_item_count
from ..primitive import next_token_targets

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# What a patched model computes for ``fused_lm_head=True`` unless TRL's head or the caller
# asks otherwise: every field the primitive gives in its one pass (log_sum_sq_probs needs a
# second pass, so it is opt-in).
DEFAULT_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """TRL's ``FusedCausalLMOutput`` fields, in TRL's order (see the module docstring).

    Fields not asked for are None; ``label_mask`` (bool) says which labels were scored.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def check_outputs(outputs) -> tuple[str, ...]:
    """``outputs`` as a tuple of known field names (``log_probs`` always included)."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list, set, frozenset)) \
            or not all(isinstance(name, str) for name in outputs):
        raise TypeError(f"outputs must be a tuple of field names from {OUTPUTS}, got {outputs!r}")
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs has unknown field(s) {unknown}; expected names from {OUTPUTS}")
    return tuple(dict.fromkeys(("log_probs", *outputs)))


def trl_head_options(model: torch.nn.Module) -> dict | None:
    """The options of a TRL fused head installed on ``model.forward``, or None.

    ``add_fused_lm_head`` replaces the instance's ``forward`` with a closure taking
    ``fused_lm_head=``; accelerate may have wrapped that again (autocast, fp32 outputs).
    The chain is walked through ``__wrapped__``; the closure's ``temperature``, ``outputs``
    and ``cast_lm_head_to_fp32`` are read so that our head computes what the trainer asked
    its own head for (GRPO's temperature, DPO's extra fields). A wrapper taking
    ``fused_lm_head`` whose options cannot be read is an error, never silently ignored.
    """
    forward, seen = vars(model).get("forward"), set()
    while forward is not None and id(forward) not in seen:
        seen.add(id(forward))
        function = getattr(forward, "__func__", forward)
        code = getattr(function, "__code__", None)
        if code is not None and "fused_lm_head" in code.co_varnames[
                :code.co_argcount + code.co_kwonlyargcount]:
            cells = dict(zip(code.co_freevars, (c.cell_contents for c in
                                                function.__closure__ or ())))
            wanted = ("temperature", "outputs", "cast_lm_head_to_fp32")
            if not all(name in cells for name in wanted):
                raise TypeError(
                    f"{type(model).__name__}.forward is wrapped by a fused LM head "
                    f"({function.__qualname__} in {code.co_filename}) whose options "
                    f"{wanted} cannot be read, so patch_causal_lm cannot serve its "
                    "fused_lm_head=True calls faithfully (before or after the patch alike). "
                    "Add the head with fused_losses.integrations.add_fused_lm_head (TRL's "
                    "signature) instead of that one")
            return {name: cells[name] for name in wanted}
        forward = getattr(function, "__wrapped__", None)
    return None


def fused_head_fields(hidden, weight, bias, labels, *, shifted: bool, num_items_in_batch,
                      temperature: float, softcap: float | None, outputs: tuple[str, ...],
                      ignore_index: int = -100, **primitive_options) -> FusedCausalLMOutput:
    """TRL's per-token fields for one batch, from one primitive call (two for
    ``log_sum_sq_probs``); ``aux_loss`` is left to the caller.

    ``temperature`` and ``softcap`` are the primitive's: the model's own logit transform
    with TRL's temperature folded in (see :func:`fused_losses.patch_causal_lm`).
    ``hidden`` [B, T, H] is scored unshifted against shifted targets (no copy of hidden);
    ``shifted`` says ``labels`` already are next-token targets (TRL's ``shift_labels``).
    """
    targets = labels if shifted else next_token_targets(labels, ignore_index)
    head = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                **primitive_options)
    stats = linear_logprobs(hidden, weight, targets, bias, return_lse="log_sum_sq_probs" in outputs,
                            return_argmax="is_top1" in outputs,
                            return_entropy="entropy" in outputs,
                            return_logits_mean="mean_logits" in outputs, **head)
    mask = targets != ignore_index
    log_sum_sq_probs = None
    if "log_sum_sq_probs" in outputs:
        with torch.no_grad():  # LSE(2z): the same head at half the temperature
            doubled = dict(head, temperature=temperature / 2,
                           softcap=None if softcap is None else 2 * softcap)
            lse_twice = linear_logprobs(hidden, weight, targets, bias, return_lse=True,
                                        **doubled).lse
        log_sum_sq_probs = torch.where(mask, lse_twice - 2 * stats.lse.detach(), 0.0)
    is_top1 = None if stats.argmax is None else (stats.argmax == targets) & mask
    mean_logits = None if stats.logits_mean is None else stats.logits_mean.detach()
    if num_items_in_batch is None:
        count = mask.sum().clamp(min=1)
    else:  # as the plain loss checks it: one positive count, a scalar loss
        check_item_count("num_items_in_batch", num_items_in_batch)
        count = num_items_in_batch.reshape(()) if isinstance(num_items_in_batch, torch.Tensor) \
            else num_items_in_batch
    fields = dict(log_probs=stats.logprobs, entropy=stats.entropy,
                  log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
                  is_top1=is_top1, label_mask=mask)
    if not shifted:  # the last position has no next token
        fields = {k: None if v is None else v[:, :-1] for k, v in fields.items()}
    return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / count, **fields)
