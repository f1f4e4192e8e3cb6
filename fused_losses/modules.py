"""``nn.Module`` wrappers: each stores a loss's hyper-parameters and calls the functional.

Swap one line in a training loop::

    loss_fn = FusedDPOLoss(beta=0.1, loss_type="ipo")
    out = loss_fn(hidden, model.lm_head.weight, labels, ref_logprobs=ref)
    out.loss.backward()

Defaults live only in the functionals (no copies to drift). Options given at construction
are checked against the functional's keywords; per-call tensors (``ref_logprobs``,
``rewards``) go to ``forward``, whose keywords override the stored ones.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from .objectives import (LossOutput, cpo_loss, dil_loss, dpo_loss, ift_loss, orpo_loss,
                         reinforce_loss, sft_loss, simpo_loss)
from .objectives._common import PRIMITIVE_OPTIONS, own_options
from .objectives.dpo import check_running_mean
from .objectives import distill_loss, grpo_loss, kto_loss, ppo_loss


class FusedLoss(nn.Module):
    """Base class: keeps ``options`` and forwards ``(*tensors, **options)`` to ``loss_fn``."""

    loss_fn: Callable[..., LossOutput]

    def __init__(self, **options):
        super().__init__()
        # return_argmax / return_entropy add the mean_token_accuracy / entropy metrics;
        # grad_in_forward picks the objectives' path (see objectives._common.fused_objective).
        valid = set(own_options(self.loss_fn)) | PRIMITIVE_OPTIONS
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid: "
                            f"{sorted(valid)}")
        self.options = options

    def forward(self, *args, **kwargs) -> LossOutput:
        return self.loss_fn(*args, **{**self.options, **kwargs})

    def default(self, name: str):
        """The option's value: as given, else the functional's default."""
        if name in self.options:
            return self.options[name]
        return inspect.signature(self.loss_fn).parameters[name].default

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedSFTLoss(FusedLoss):
    """:func:`sft_loss` (f-divergence SFT); ``forward(hidden, weight, labels, **kw)``."""

    loss_fn = staticmethod(sft_loss)


class FusedDPOLoss(FusedLoss):
    """:func:`dpo_loss`; ``forward(hidden, weight, labels, ref_logprobs=..., **kw)``.

    With ``loss_type="bco_pair"`` the running mean reward δ and the number of batch means it
    averages are buffers (``bco_delta``, ``bco_count``, saved in the state dict), updated
    after each call in training mode, as TRL's running moments are. Under data parallelism
    pass ``bco_process_group=`` (at construction or per call) so every rank folds in every
    rank's batch mean and the buffers stay equal across ranks. A ``bco_delta``/``bco_count``
    given at construction is the buffers' starting value; given to ``forward``, it replaces
    the buffers' values for that call.
    """

    loss_fn = staticmethod(dpo_loss)

    def __init__(self, **options):
        super().__init__(**options)
        self.tracks_delta = self.default("loss_type") == "bco_pair"
        if self.tracks_delta:
            start = {name: self.options.pop(name, 0.0) for name in ("bco_delta", "bco_count")}
            check_running_mean(start["bco_delta"], start["bco_count"])
            for name, value in start.items():
                self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32)
                                     .detach().clone().reshape(()))

    def forward(self, *args, **kwargs) -> LossOutput:
        if not self.tracks_delta or kwargs.get("loss_type", "bco_pair") != "bco_pair":
            return super().forward(*args, **kwargs)
        running = {"bco_delta": self.bco_delta, "bco_count": self.bco_count, **kwargs}
        out = super().forward(*args, **running)
        if self.training:
            with torch.no_grad():
                self.bco_delta.copy_(out.metrics["bco/delta"])
                self.bco_count.copy_(out.metrics["bco/count"])
        return out


class FusedSimPOLoss(FusedLoss):
    """:func:`simpo_loss`; ``forward(hidden, weight, labels, **kw)``."""

    loss_fn = staticmethod(simpo_loss)


class FusedORPOLoss(FusedLoss):
    """:func:`orpo_loss`; ``forward(hidden, weight, labels, **kw)``."""

    loss_fn = staticmethod(orpo_loss)


class FusedCPOLoss(FusedLoss):
    """:func:`cpo_loss`; ``forward(hidden, weight, labels, **kw)``."""

    loss_fn = staticmethod(cpo_loss)


class FusedDILLoss(FusedLoss):
    """:func:`dil_loss`; ``forward(hidden, weight, labels, ref_logprobs=..., **kw)``."""

    loss_fn = staticmethod(dil_loss)


class FusedIFTLoss(FusedLoss):
    """:func:`ift_loss`; ``forward(model, input_ids, labels, attention_mask=None, **kw)``."""

    loss_fn = staticmethod(ift_loss)


class FusedReinforceLoss(FusedLoss):
    """:func:`reinforce_loss`; ``forward(hidden, weight, labels, rewards=..., **kw)``."""

    loss_fn = staticmethod(reinforce_loss)


class FusedDistillLoss(FusedLoss):
    """:func:`distill_loss`; ``forward(hidden, weight, teacher_hidden, teacher_weight, labels,
    **kw)``. Takes only ``distill_loss``'s own options (it has no softcap, no ``return_*``)."""

    loss_fn = staticmethod(distill_loss)

    def __init__(self, **options):
        valid = set(own_options(distill_loss))
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"FusedDistillLoss got unknown option(s) {unknown}; valid: "
                            f"{sorted(valid)}")
        super().__init__(**options)


class FusedGRPOLoss(FusedLoss):
    """:func:`grpo_loss`; ``forward(hidden, weight, labels, advantages, old_logprobs=...,
    ref_logprobs=..., **kw)``."""

    loss_fn = staticmethod(grpo_loss)


class FusedPPOLoss(FusedGRPOLoss):
    """:func:`ppo_loss`: options as :class:`FusedGRPOLoss`; ``forward(hidden, weight, labels,
    advantages [B, T], old_logprobs=..., **kw)``."""

    def forward(self, *args, **kwargs) -> LossOutput:
        return ppo_loss(*args, **{**self.options, **kwargs})


class FusedKTOLoss(FusedLoss):
    """:func:`kto_loss`; ``forward(hidden, weight, labels, preference_labels,
    ref_logprobs=... (or TRL's ref_logps=...), kl=... or kl_hidden=..., kl_labels=...,
    kl_ref_logprobs=... (or TRL's ref_KL_logps=...), **kw)``."""

    loss_fn = staticmethod(kto_loss)


__all__ = ["FusedLoss", "FusedSFTLoss", "FusedDPOLoss", "FusedSimPOLoss", "FusedORPOLoss",
           "FusedCPOLoss", "FusedDILLoss", "FusedIFTLoss", "FusedReinforceLoss",
           "FusedGRPOLoss", "FusedPPOLoss", "FusedKTOLoss", "FusedDistillLoss"]
