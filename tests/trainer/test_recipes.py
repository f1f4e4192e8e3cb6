"""Recipes on hand-made batches: item counts, option checks, the unfused steps' edge cases."""
from __future__ import annotations

import inspect

import pytest
import torch

from fused_losses.trainer.recipes import RECIPES, keyword_defaults, options

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


# --- GRPO, KTO and distillation train on the model's own logits -----------------------------

def own_logprobs(model, batch, temperature: float = 1.0):
    """The model's own ``logits`` (its forward: soft-cap, logit scale) divided by
    ``temperature``, next-token log-probs: ([B, T−1] log-prob of each target, [B, T−1]
    scored mask, [B, T−1, V] log-softmax)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_p = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    logp = log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, logp, torch.zeros_like(logp)), scored.to(logp.dtype), log_p


def nudge(lm, seed: int = 1) -> None:
    """Move the policy away from the frozen copies taken of it (references see a gap)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def gradients(loss, lm) -> list[torch.Tensor]:
    params = [p for p in lm.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def assert_same_loss_and_gradients(got, want, lm):
    torch.testing.assert_close(got.double(), want.double())
    for a, b in zip(gradients(got, lm), gradients(want, lm)):
        torch.testing.assert_close(a, b)


# Gemma-2 soft-caps its logits (at 2.0, the head spread so that the cap bends them); Cohere
# scales them by 0.25, with a sampling temperature on top.
GRPO_ON = [("gemma2", {}), ("cohere", {"--temperature": 0.7})]


@pytest.mark.parametrize("arch,flags", GRPO_ON, ids=[a for a, _ in GRPO_ON])
@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_grpo_loss_is_trls_on_the_models_own_logits(impl, arch, flags):
    """Both steps applied the bare head weight: on Gemma-2 the KL to a reference scored with
    the cap, the entropy and every gradient were those of other logits."""
    from tests.integrations.models import build, model_inputs

    lm = build(arch)
    inputs, labels = model_inputs(arch, batch=4)
    rewards = torch.tensor([1.0, 0.05, 0.2, 0.0], dtype=torch.float64)
    batch = dict(inputs, labels=labels, rewards=rewards, advantages=rewards - 0.3)
    grpo = RECIPES["grpo"]
    opts = options(grpo, {"--beta": 0.2, "entropy_coef": 0.1, **flags}, impl)
    models = grpo.frozen(loop_config("grpo", beta=0.2), lm, opts)
    nudge(lm)
    ctx = dict(grpo.context(models, batch, impl, opts), num_items=grpo.items(batch, opts))
    loss, metrics = getattr(grpo, impl)(opts)(lm, batch, ctx)

    temperature = flags.get("--temperature", 1.0)
    logp, mask, log_p = own_logprobs(lm, batch, temperature)
    with torch.no_grad():
        ref = own_logprobs(models["ref"], batch, temperature)[0]
    advantages = batch["advantages"].unsqueeze(1)
    gap = ref - logp
    per_token = -torch.exp(logp - logp.detach()) * advantages + 0.2 * (torch.exp(gap) - gap - 1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    want = ((per_token - 0.1 * entropy) * mask).sum() / mask.sum()  # dapo: the step's tokens
    torch.testing.assert_close(metrics["kl"].double(),
                               ((torch.exp(gap) - gap - 1) * mask).sum() / mask.sum())
    assert_same_loss_and_gradients(loss, want, lm)


@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_kto_loss_is_trls_on_the_models_own_logits(impl):
    from tests.integrations.models import build, model_inputs

    lm = build("gemma2")
    inputs, labels = model_inputs("gemma2", batch=4)  # two desirable rows, two undesirable
    # No padding: a mismatched pair padded past the tiny model's sliding window (4) has
    # positions that attend to nothing, NaN in its own forward.
    batch = dict(inputs, labels=labels, attention_mask=torch.ones_like(labels))
    kto = RECIPES["kto"]
    opts = options(kto, {"--beta": 0.5}, impl)
    models = kto.frozen(None, lm, opts)
    nudge(lm)
    ctx = dict(kto.context(models, batch, impl, opts), num_items=kto.items(batch, opts))
    loss, metrics = getattr(kto, impl)(opts)(lm, batch, ctx)

    def sums(model, rows):
        logp, mask, _ = own_logprobs(model, rows)
        return (logp * mask).sum(-1)

    with torch.no_grad():
        kl_batch = ctx["kl_batch"]
        z = (sums(lm, kl_batch) - sums(models["ref"], kl_batch)).mean().clamp(min=0)
        ref = sums(models["ref"], batch)
    rho = sums(lm, batch) - ref
    good = torch.tensor([True, True, False, False])
    want = torch.where(good, 1 - torch.sigmoid(0.5 * (rho - z)),
                       1 - torch.sigmoid(0.5 * (z - rho))).mean()
    torch.testing.assert_close(metrics["kl"].double(), z)
    assert_same_loss_and_gradients(loss, want, lm)


@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_distill_loss_is_on_both_models_own_logits(impl):
    """A Granite student (logits divided by 4) and a Cohere teacher (× 0.25, tied head): each
    logit scale is folded into its model's hidden states; the bare heads gave 16 times the
    logits of each."""
    from tests.integrations.models import build, model_inputs

    student, teacher = build("granite"), build("cohere", seed=1).requires_grad_(False)
    inputs, labels = model_inputs("granite", batch=3)
    batch = dict(inputs, labels=labels)
    distill = RECIPES["distill"]
    opts = options(distill, {"--divergence": "forward_kl", "--temperature": 2.0,
                             "--hard-weight": 0.5}, impl)
    ctx = dict(distill.context({"teacher": teacher}, batch, impl, opts),
               num_items=distill.items(batch, opts))
    loss, metrics = getattr(distill, impl)(opts)(student, batch, ctx)

    logq, mask, log_q = own_logprobs(student, batch, 2.0)
    with torch.no_grad():
        log_p = own_logprobs(teacher, batch, 2.0)[2]
    divergence = (log_p.exp() * (log_p - log_q)).sum(-1)
    cross_entropy = -own_logprobs(student, batch)[0]  # the hard term: temperature 1
    want = ((divergence + 0.5 * cross_entropy) * mask).sum() / mask.sum()
    torch.testing.assert_close(metrics["divergence"].double(),
                               (divergence * mask).sum() / mask.sum())
    assert_same_loss_and_gradients(loss, want, student)


def loop_config(objective: str, **fields):
    from fused_losses.trainer.config import Config

    return Config(objective=objective, output_dir="unused", model_config="{}", **fields)


@pytest.mark.parametrize("objective", sorted(RECIPES))
def test_no_tensor_argument_is_offered_as_a_user_option(objective):
    """The step provides the objective's tensors (references, hidden states, KL inputs);
    a tensor argument missing from ``Recipe.provided`` would be settable by --loss-kwargs."""
    recipe = RECIPES[objective]
    parameters = inspect.signature(recipe.objective).parameters
    offered = [name for name in keyword_defaults(recipe)
               if "Tensor" in str(parameters[name].annotation)]
    assert not offered, offered
