"""IFT, Intuitive Fine-Tuning (``objectives.md`` §4): SFT on states nudged towards the
model's own predictions, with losses propagated backwards along the sequence.

Paper: ``seeds/intuitive-fine-tuning-ift.txt`` §4.1 (Eq. 17), §4.2 (Eq. 22), App. B.3; the
official code (TsinghuaC3I/Intuitive-Fine-Tuning, ``propagation_side=left``, ``L1``) is
followed where the two differ.
"""
from __future__ import annotations

import torch

from ._common import (LossOutput, check_labels, check_range, discounted_suffix_sum,
                      fused_objective, masked_mean, shift_targets, token_metrics, token_stats)
from .logprobs import causal_lm_head, decoder_hidden, merged_options


def ift_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    lam: float = 0.2,
    gamma: float = 0.95,
    detach_weights: bool = False,
    eps: float = 1e-8,
    **primitive_options,
) -> LossOutput:
    """Intuitive Fine-Tuning in two fused passes of a Hugging Face causal LM.

    1. No grad, clean inputs: ``â_j = argmax z_j`` from the primitive's argmax output.
    2. ``x̃_j = â_{j−1}`` where ``labels[j]`` is scored, ``x_j`` elsewhere (prompt, padding).
    3. ``e = (1−λ)·E(x) + λ·E(x̃)``; pass 2 with gradient on ``inputs_embeds=e`` gives
       ``ℓ_t = −logp''_t`` against the true labels.
    4. ``R_t = Σ_{j≥t} γ^{j−t} m_j ℓ_j`` (raw positions), and per sequence
       ``L_seq = Σ_t m_t R_t ℓ_t / (Σ_t m_t R_t + eps)``; the loss is the mean over sequences
       with a scored token.

    With ``gamma = 0`` the weights are 1 on every scored token, as in the official code
    (``get_cumsum_weight`` returns ones for γ = 0), so λ = 0, γ = 0 is exactly SFT: the
    sequence-mean of the token-mean NLL. ``ℓ`` in ``R`` is pass 2's, with gradient, as in
    the official code (the paper's pseudo-code uses pass 1's).

    Args:
        model (nn.Module): a Hugging Face ``*ForCausalLM``.
        input_ids (LongTensor): [B, T].
        labels (LongTensor): [B, T] Hugging Face labels (``-100`` on prompt and padding).
        attention_mask (Tensor, optional): [B, T]. Default: None.
        lam (float): λ in [0, 1], the share of the predicted token's embedding. Default: 0.2.
        gamma (float): γ in [0, 1], ``propagation_decay``. Default: 0.95.
        detach_weights (bool): stop the gradient through ``R`` (the official code does
            not). Default: False.
        eps (float): added to each sequence's ``Σ R``. Default: 1e-8.
        **primitive_options: passed to :func:`linear_logprobs` in both passes.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; metrics ``nll`` (pass 2 token-mean NLL) and ``nll/clean`` (pass 1,
        free: the primitive returns log-probs with the argmax); ``mean_token_accuracy`` /
        ``entropy`` of pass 2 when ``return_argmax`` / ``return_entropy`` is passed.

    Paper: Hua et al. 2024, "Intuitive Fine-Tuning", §4.1 Eq. 17, §4.2 Eq. 22, App. B.3.
    """
    check_range("lam", lam, 0.0, 1.0, closed=True)
    check_range("gamma", gamma, 0.0, 1.0, closed=True)
    if tuple(input_ids.shape) != tuple(labels.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape [B, T]")
    ignore_index = primitive_options.get("ignore_index", -100)
    head = causal_lm_head(model)
    options = merged_options(head, primitive_options)
    with torch.no_grad():  # pass 1: greedy predictions, never the logits
        hidden = decoder_hidden(head, input_ids=input_ids, attention_mask=attention_mask)
        check_labels(hidden, labels)
        clean = token_stats(hidden, head.weight, labels, options, return_argmax=True)
        del hidden
    predicted = torch.cat((input_ids[:, :1], clean.out.argmax[:, :-1]), dim=1)
    mixed_ids = torch.where(labels == ignore_index, input_ids, predicted)
    embed = model.get_input_embeddings()
    embeds = (1 - lam) * embed(input_ids) + lam * embed(mixed_ids)
    hidden = decoder_hidden(head, inputs_embeds=embeds, attention_mask=attention_mask)
    scored = shift_targets(labels, ignore_index) != ignore_index
    has_any = scored.any(-1)

    def loss_from(stats, present):  # pass 2; groups are sequences (R sums along each)
        mask = stats.mask
        nll = -stats.out.logprobs * mask
        if gamma == 0:
            weights = mask
        else:
            weights = discounted_suffix_sum(nll, gamma) * mask
            if detach_weights:
                weights = weights.detach()
        denominator = weights.sum(-1) + (eps if gamma else 0.0)
        per_seq = (weights * nll).sum(-1) / torch.where(has_any, denominator,
                                                        torch.ones_like(denominator))
        counted = has_any & present
        return torch.where(counted, per_seq, torch.zeros_like(per_seq)).sum() \
            / has_any.sum().clamp_min(1)

    loss, stats = fused_objective(hidden, head.weight, labels, options, loss_from,
                                  groups="sequence")
    metrics = {"nll": masked_mean(-stats.out.logprobs.detach(), stats.mask),
               "nll/clean": -masked_mean(clean.out.logprobs, clean.mask),
               **token_metrics(stats)}
    return LossOutput(loss, metrics)
