"""IFT, Intuitive Fine-Tuning (``objectives.md`` §4): two passes of the model, mixed input
embeddings (from a frozen table by default, as the official code), a loss weighted by
discounted suffix sums of the NLL.

Items: sequences with a scored token (``ift_loss`` averages over those), so gradient
accumulation weights every such sequence equally.
"""
from __future__ import annotations

import torch

import fused_losses

from ._common import (Recipe, decode, head, masked_mean, materialise, scored_rows,
                      suffix_sums, IGNORE)


def fused(opts):
    def step(lm, batch, ctx):
        out = fused_losses.ift_loss(lm, batch["input_ids"], batch["labels"],
                                    attention_mask=batch["attention_mask"], **opts)
        return out.loss * items(batch, opts) / ctx["num_items"], dict(out.metrics)
    return step


def unfused(opts):
    lam, gamma, eps = opts["lam"], opts["gamma"], opts["eps"]
    train_embeddings = opts["train_embeddings"]

    def step(lm, batch, ctx):
        ids, labels = batch["input_ids"], batch["labels"]
        with torch.no_grad():  # pass 1: greedy predictions from the full logits
            hidden = decode(lm, batch)
            lm_head = head(lm, hidden)
            clean = materialise(hidden, lm_head.weight, labels, **lm_head.options)
            greedy = clean.logits.argmax(-1)
        # x̃_j = â_{j−1} where labels[j] is scored; the true token elsewhere (column 0 has no
        # prediction before it).
        predicted = torch.cat((ids[:, :1], greedy[:, :-1]), dim=1)
        mixed_ids = torch.where(labels == IGNORE, ids, predicted)
        embed = lm.get_input_embeddings()
        mixed = (1 - lam) * embed(ids) + lam * embed(mixed_ids)
        if not train_embeddings:  # the official code embeds through a frozen table
            mixed = mixed.detach()
        hidden = decode(lm, batch, inputs_embeds=mixed)
        lm_head = head(lm, hidden)
        stats = materialise(hidden, lm_head.weight, labels, **lm_head.options)
        mask = stats.mask
        nll = -stats.logp * mask
        if gamma == 0:  # the official code's weights for γ = 0: ones, and no eps
            weights, denominator_eps = mask, 0.0
        else:
            weights, denominator_eps = suffix_sums(nll, gamma) * mask, eps
            if opts["detach_weights"]:
                weights = weights.detach()
        rows = mask.sum(-1) > 0
        per_row = (weights * nll).sum(-1) / torch.where(
            rows, weights.sum(-1) + denominator_eps, torch.ones_like(nll[:, 0]))
        loss = torch.where(rows, per_row, torch.zeros_like(per_row)).sum() / ctx["num_items"]
        return loss, {"nll": masked_mean(nll.detach(), mask),
                      "nll/clean": -masked_mean(clean.logp, clean.mask)}
    return step


def items(batch, opts) -> int:
    return int(scored_rows(batch).sum())


RECIPE = Recipe(objective=fused_losses.ift_loss, data="sft", fused=fused, unfused=unfused,
                unfused_options=frozenset({"lam", "gamma", "detach_weights", "eps",
                                           "train_embeddings"}),
                # input_embeddings is a table, not a JSON value: the default (a frozen copy of
                # the model's) is the recipe's choice; --loss-kwargs train_embeddings sets the other
                items=items, provided=frozenset({"attention_mask", "input_embeddings"}))
