"""IFT, Intuitive Fine-Tuning (``objectives.md`` §4): SFT on states nudged towards the
model's own predictions, with losses propagated backwards along the sequence.

Paper: ``seeds/intuitive-fine-tuning-ift.txt`` §4.1 (Eq. 17), §4.2 (Eq. 22), App. B.3; the
official code (TsinghuaC3I/Intuitive-Fine-Tuning, ``propagation_side=left``, ``L1``) is
followed where the two differ.
"""
from __future__ import annotations

import torch

from ._common import (LossOutput, check_bool, check_labels, check_options, check_positive,
                      check_range, discounted_suffix_sum, fused_objective, masked, masked_mean,
                      own_options, shift_targets, token_metrics, token_stats)
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
    input_embeddings: torch.nn.Module | torch.Tensor | None = None,
    train_embeddings: bool = False,
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

    The embedding ``E``: both passes embed through a table that gets no gradient, as the
    official code does (``trainers.py`` keeps a frozen copy, ``embed_tokens``, of the input
    embeddings, taken when training starts). By default that table is the model's own input
    embedding, detached, so the loss sends no gradient into the input embeddings; a tied
    head still trains, as the head. Pass ``input_embeddings`` (a frozen copy made before
    training) to reproduce the official code exactly with a tied head, whose live embeddings
    move with the head; pass ``train_embeddings=True`` to let the mixing's gradient reach
    the live input embeddings instead.

    With ``gamma = 0`` the weights are 1 on every scored token, as in the official code
    (``get_cumsum_weight`` returns ones for γ = 0), so λ = 0, γ = 0 is exactly SFT: the
    sequence-mean of the token-mean NLL. ``ℓ`` in ``R`` is pass 2's, with gradient, as in
    the official code (the paper's pseudo-code uses pass 1's).

    Shifting: ``labels`` are Hugging Face labels aligned with ``input_ids``; the loss shifts
    them itself (the hidden state at t predicts ``labels[:, t+1]``). The primitive
    :func:`linear_logprobs` instead takes targets already aligned with ``hidden``.

    Args:
        model (nn.Module): a Hugging Face ``*ForCausalLM``.
        input_ids (LongTensor): [B, T].
        labels (LongTensor): [B, T] Hugging Face labels (``-100`` on prompt and padding).
        attention_mask (Tensor, optional): [B, T]. Default: None.
        lam (float): λ in [0, 1], the share of the predicted token's embedding. Default: 0.2.
        gamma (float): γ in [0, 1], ``propagation_decay``. Default: 0.95.
        detach_weights (bool): stop the gradient through ``R`` (the official code does
            not). Default: False.
        eps (float): > 0, added to each sequence's ``Σ R``. Default: 1e-8.
        input_embeddings (nn.Module or Tensor, optional): the frozen table both passes
            embed with: a module mapping ids to embeddings, or a [V, H] weight used in the
            model's own embedding module (its padding index and any scaling kept). No
            gradient reaches it. Default: None (the model's input embedding, detached).
        train_embeddings (bool): embed with the live input embeddings, so the loss's
            gradient reaches them (not the official code's behaviour). Default: False.
        **primitive_options: passed to :func:`linear_logprobs` in both passes.
            ``grad_in_forward`` (bool, optional): form the gradients in forward (torch
            backend default) or recompute in backward (``False``); see
            :func:`~fused_losses.objectives._common.fused_objective`. Default: None.

    Returns:
        LossOutput: loss; metrics ``nll`` (pass 2 token-mean NLL) and ``nll/clean`` (pass 1,
        free: the primitive returns log-probs with the argmax); ``mean_token_accuracy`` /
        ``entropy`` of pass 2 when ``return_argmax`` / ``return_entropy`` is passed.

    Paper: Hua et al. 2024, "Intuitive Fine-Tuning", §4.1 Eq. 17, §4.2 Eq. 22, App. B.3;
    official code: TsinghuaC3I/Intuitive-Fine-Tuning ``src/trainers.py``.
    """
    check_options("ift_loss", primitive_options, own=own_options(ift_loss))
    check_range("lam", lam, 0.0, 1.0, closed=True)
    check_range("gamma", gamma, 0.0, 1.0, closed=True)
    check_bool("detach_weights", detach_weights)
    check_positive("eps", eps)
    check_bool("train_embeddings", train_embeddings)
    if train_embeddings and input_embeddings is not None:
        raise ValueError("pass input_embeddings (a frozen table) or train_embeddings=True (the "
                         "live one, with gradient), not both")
    for name, ids in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor [B, T], got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(input_ids.shape) != tuple(labels.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape [B, T]")
    ignore_index = primitive_options.get("ignore_index", -100)
    head = causal_lm_head(model)
    options = merged_options(head, primitive_options)
    embed = _embedding(model, input_embeddings, train_embeddings)
    clean_embeds = embed(input_ids)
    with torch.no_grad():  # pass 1: greedy predictions, never the logits
        hidden = decoder_hidden(head, inputs_embeds=clean_embeds, attention_mask=attention_mask)
        check_labels(hidden, labels)
        clean = token_stats(hidden, head.weight, labels, options, return_argmax=True)
        del hidden
    predicted = torch.cat((input_ids[:, :1], clean.out.argmax[:, :-1]), dim=1)
    mixed_ids = torch.where(labels == ignore_index, input_ids, predicted)
    embeds = (1 - lam) * clean_embeds + lam * embed(mixed_ids)
    hidden = decoder_hidden(head, inputs_embeds=embeds, attention_mask=attention_mask)
    scored = shift_targets(labels, ignore_index) != ignore_index
    has_any = scored.any(-1)

    def loss_from(stats, present):  # pass 2; groups are sequences (R sums along each)
        mask = stats.mask
        nll = masked(-stats.out.logprobs, mask)
        if gamma == 0:
            weights = mask
        else:
            weights = masked(discounted_suffix_sum(nll, gamma), mask)
            if detach_weights:
                weights = weights.detach()
        denominator = weights.sum(-1) + (eps if gamma else 0.0)
        per_seq = (weights * nll).sum(-1) / torch.where(has_any, denominator,
                                                        torch.ones_like(denominator))
        counted = has_any & present
        return masked(per_seq, counted).sum() / has_any.sum().clamp_min(1)

    loss, stats = fused_objective(hidden, head.weight, labels, options, loss_from,
                                  groups="sequence")
    metrics = {"nll": masked_mean(-stats.out.logprobs.detach(), stats.mask),
               "nll/clean": -masked_mean(clean.out.logprobs, clean.mask),
               **token_metrics(stats)}
    return LossOutput(loss, metrics)


def _embedding(model, table, live: bool):
    """``ids -> embeddings`` for both passes: the live input embedding (``live``), a given
    frozen module, or the model's embedding module run on a frozen (detached) weight."""
    module = model.get_input_embeddings()
    if live:
        return module
    if isinstance(table, torch.nn.Module):
        return lambda ids: table(ids).detach()
    if table is None:
        table = module.weight
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(module.weight.shape):
        raise ValueError(f"input_embeddings must be an nn.Module or a tensor shaped like the "
                         f"model's input embedding {tuple(module.weight.shape)}, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    frozen = {"weight": table.detach()}
    return lambda ids: torch.func.functional_call(module, frozen, (ids,))
