"""Knowledge distillation from a teacher's LM head (``objectives.md`` §9).

Per scored position the divergence between the teacher's and the student's next-token
distributions over the whole vocabulary, token-mean over scored positions, plus ``hard_weight``
× the student's cross-entropy on the labels; one call of the two-head divergence primitive
(:mod:`fused_losses.divergence`), whose formulas and gradients are in its docstring.
Papers: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), §2 (temperature,
soft + hard targets); Agarwal et al., "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes" (GKD, ICLR 2024), §3, Eq. 1 (generalised JSD).
"""
from __future__ import annotations

import torch

from ..divergence import Divergence, linear_divergence_loss
from ..primitive import check_ignore_index
from ._common import (IGNORE_INDEX, NLL_LOSS, LossOutput, check_count, check_labels,
                      masked_mean, shift_targets)


def distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
    grad_in_forward: bool | None = None,
) -> LossOutput:
    """Distillation: ``loss = Σ_t m_t (D_t + hard_weight·CE_t) / Σ_t m_t`` on two fused heads.

    With ``Q_t = softmax(z_t/τ)`` (student, ``z = hidden @ weight.T + bias``) and
    ``P_t = softmax(z^T_t/τ)`` (teacher, its own head and H), ``D_t`` is

    * ``forward_kl``: KL(P‖Q) = Σ_v P_v log(P_v/Q_v);
    * ``reverse_kl``: KL(Q‖P);
    * ``jsd``: TRL GKD's generalised JSD, ``β·KL(P‖M) + (1−β)·KL(Q‖M)`` with
      ``M = β·P + (1−β)·Q``; β = 0 is KL(P‖Q) and β = 1 is KL(Q‖P) (as TRL and Liger define
      them; the formula itself tends to 0 at both ends).

    ``CE_t = −log softmax(z_t)[y]`` is the student's cross-entropy at temperature 1 (Liger's
    hard loss). ``m_t`` marks the scored positions: Hugging Face labels, shifted inside
    (``hidden[:, t]`` predicts ``labels[:, t+1]``). Only the student gets gradients; neither
    model's ``[B·T, V]`` logits are formed. Equal to Liger's ``LigerFusedLinearJSDLoss``
    (``weight_soft_loss=1``, ``weight_hard_loss=hard_weight``, shifted inputs); with
    ``hard_weight=0``, the token mean of TRL's per-token ``ChunkedDivergenceFunction`` and
    the formula of TRL GKD's ``generalized_jsd_loss(labels=..., reduction="batchmean")``.

    Args:
        hidden (Tensor): [B, T, H] student's final hidden states (unshifted; never copied).
        weight (Tensor): [V, H] student's LM head.
        teacher_hidden (Tensor): [B, T, H_t] teacher's final hidden states for the same
            tokens; H_t may differ from H. No gradient.
        teacher_weight (Tensor): [V, H_t] teacher's LM head, the same vocabulary V.
        labels (LongTensor): [B, T] Hugging Face labels, ``ignore_index`` on prompt/padding.
        divergence (str): ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``. Default: "jsd".
        beta (float): in [0, 1], the JSD's teacher weight in M. Default: 0.5.
        temperature (float): > 0; divides both models' logits (not the hard term's).
            Default: 1.0.
        hard_weight (float): weight of the cross-entropy on the labels. Default: 0.0.
        bias, teacher_bias (Tensor, optional): [V] head biases. Default: None.
        num_items_in_batch (int or Tensor, optional): divide the summed loss by this count of
            scored tokens instead of this batch's own (gradient accumulation). Default: None.
        ignore_index (int): label value of unscored positions. Default: -100.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"cublas"``
            (:func:`~fused_losses.divergence.linear_divergence`). Default: "auto".
        chunk_size (int, optional): torch backend: tokens per chunk. Default: None (sized by
            memory).
        grad_in_forward (bool, optional): see :func:`~fused_losses.divergence.
            linear_divergence_loss` (default on for the torch and cuBLAS backends when the
            student needs gradients; the loss may then be backpropagated once).
            Default: None.

    Returns:
        LossOutput: scalar loss; metrics ``divergence`` (token mean of D) and, when
        ``hard_weight`` ≠ 0, ``nll_loss`` (token mean of CE).

    Paper: GKD §3 Eq. 1; Hinton et al. 2015 §2.
    """
    check_labels(hidden, labels)
    check_ignore_index(ignore_index)
    check_count("num_items_in_batch", num_items_in_batch)
    targets = shift_targets(labels, ignore_index)
    total, out = linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, bias=bias,
        teacher_bias=teacher_bias, divergence=divergence, beta=beta, temperature=temperature,
        hard_weight=hard_weight, ignore_index=ignore_index, backend=backend,
        chunk_size=chunk_size, grad_in_forward=grad_in_forward)
    mask = (targets != ignore_index).to(out.divergence.dtype)
    if num_items_in_batch is None:
        divisor = mask.sum().clamp_min(1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        divisor = num_items_in_batch.to(total.device)
    else:
        divisor = num_items_in_batch
    metrics = {"divergence": masked_mean(out.divergence.detach(), mask)}
    if out.logprobs is not None:
        metrics[NLL_LOSS] = -masked_mean(out.logprobs.detach(), mask)
    return LossOutput(total / divisor, metrics)
