"""Recipes on hand-made batches: item counts, option checks, the unfused steps' edge cases."""
from __future__ import annotations

import pytest
import torch

from fused_losses.trainer.recipes import RECIPES, options

from .trainer_helpers import tiny_model

IGNORE = -100


def batch_with_an_empty_row(rows: int = 4, length: int = 12, empty: int = 1) -> dict:
    """Right-padded rows of random tokens, a 4-token prompt; row ``empty`` scores nothing."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[empty] = IGNORE
    labels[2, 9:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_head_grad(step, lm, batch, num_items):
    lm.zero_grad(set_to_none=True)
    loss, metrics = step(lm, batch, {"num_items": num_items})
    loss.backward()
    return loss.detach(), lm.get_output_embeddings().weight.grad.clone(), metrics


@pytest.mark.parametrize("gamma", [0.95, 0.0])
def test_ift_averages_over_rows_with_a_scored_token(tok_cache, gamma):
    # The unfused IFT step averaged over every row: 33% off with one empty row of three, and
    # NaN (0/0) with gamma = 0; the item count counted the empty row too.
    recipe, lm, batch = RECIPES["ift"], tiny_model(), batch_with_an_empty_row()
    opts = options(recipe, {"gamma": gamma}, "unfused")
    assert recipe.items(batch, opts) == 3
    fused = loss_and_head_grad(recipe.fused(opts), lm, batch, 3)
    unfused = loss_and_head_grad(recipe.unfused(opts), lm, batch, 3)
    assert torch.isfinite(unfused[0])
    torch.testing.assert_close(unfused[0], fused[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unfused[1], fused[1], rtol=1e-4, atol=1e-7)
    assert unfused[2].keys() == fused[2].keys()


@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_ift_micro_batches_add_up_to_the_batch(tok_cache, impl):
    # Each micro-batch's loss is a share of the step's items (rows with a scored token), so
    # two halves, one holding the empty row, sum to the whole batch's loss and gradient.
    recipe, lm, batch = RECIPES["ift"], tiny_model(), batch_with_an_empty_row()
    opts = options(recipe, {}, impl)
    step = getattr(recipe, impl)(opts)
    items = recipe.items(batch, opts)
    whole = loss_and_head_grad(step, lm, batch, items)
    halves = [loss_and_head_grad(step, lm, {k: v[rows] for k, v in batch.items()}, items)
              for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(halves[0][1] + halves[1][1], whole[1], rtol=1e-4, atol=1e-7)


def test_options_are_checked_and_completed():
    sft = RECIPES["sft"]
    opts = options(sft, {"--divergence": "kl", "max_weight": 5.0}, "fused")
    assert opts["divergence"] == "kl" and opts["max_weight"] == 5.0 and "beta" in opts
    with pytest.raises(ValueError, match=r"--loss-kwargs 'max_wieght': not an option of sft_loss"):
        options(sft, {"max_wieght": 5.0}, "fused")
    with pytest.raises(ValueError, match=r"--loss-type: not an option of sft_loss"):
        options(sft, {"--loss-type": "ipo"}, "fused")
    assert options(RECIPES["orpo"], {"--beta": 0.5}, "unfused")["lam"] == 0.5
    with pytest.raises(ValueError, match="'lam' sets lam a second time"):
        options(RECIPES["orpo"], {"--beta": 0.5, "lam": 0.2}, "fused")
    assert options(sft, {"backend": "torch"}, "fused")["backend"] == "torch"
    with pytest.raises(ValueError, match=r"--impl unfused does not implement \['backend'\]"):
        options(sft, {"backend": "torch"}, "unfused")
    with pytest.raises(ValueError, match="'ref_logprobs': not an option"):  # the trainer's own
        options(RECIPES["dpo"], {"ref_logprobs": 0}, "fused")



@pytest.mark.parametrize("arch", ["gemma2", "cohere"])  # final_logit_softcapping, logit_scale
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_the_loss_is_the_models_own_whatever_its_logit_transform(arch, impl):
    """Both steps applied the bare head to the decoder's output: on Gemma-2 or Cohere the
    trained loss was not the model's (5.28 vs the stock 4.74 on this batch), while the frozen
    reference (token_logprobs) applied the transform: DPO's rewards were off at step 0."""
    from tests.integrations.models import build, model_inputs

    lm = build(arch)
    inputs, labels = model_inputs(arch, batch=4)
    batch = dict(inputs, labels=labels)
    sft = RECIPES["sft"]
    loss, _ = getattr(sft, impl)(options(sft, {}, impl))(
        lm, batch, {"num_items": int((labels[:, 1:] != IGNORE).sum())})
    torch.testing.assert_close(loss, lm(**inputs, labels=labels).loss.double())
    dpo = RECIPES["dpo"]
    opts = options(dpo, {}, impl)
    ctx = dict(dpo.context(dpo.frozen(None, lm, opts), batch, impl, opts), num_items=2)
    _, metrics = getattr(dpo, impl)(opts)(lm, batch, ctx)
    for name in ("rewards/chosen", "rewards/rejected"):  # the policy is its reference
        torch.testing.assert_close(metrics[name].double(), torch.zeros((), dtype=torch.float64),
                                   rtol=0, atol=1e-12)
