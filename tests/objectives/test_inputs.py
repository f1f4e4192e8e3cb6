"""What every objective does with its inputs: NaN or inf at ignored positions never reach the
loss or a gradient, an empty batch is a zero loss, an unknown keyword is a TypeError naming
the public function."""
import inspect
import math

import pytest
import torch

import fused_losses
from fused_losses import (cpo_loss, dil_loss, distill_loss, dpo_loss, grpo_loss, ift_loss,
                          kto_loss, objectives, orpo_loss, ppo_loss, reinforce_loss, sft_loss,
                          simpo_loss, token_logprobs, token_rewards)
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.models import lm_batch, tiny_model
from tests.objectives.naive import batch, grads, pairs

F64 = torch.float64
TORCH = dict(backend="torch")


def _poisoned(values, labels, poison):
    """``values`` with ``poison`` everywhere a label is ignored (and in column 0)."""
    ignored = labels == -100
    ignored[:, 0] = True
    return torch.where(ignored, torch.full_like(values, poison), values)


# (loss function, per-token input names, fixed keyword options, needs pairs)
PER_TOKEN_INPUTS = [
    (sft_loss, ("ref_logprobs",), dict(divergence="kl"), False),
    (sft_loss, ("ref_logprobs",), dict(divergence="gan", value_mode="token",
                                       value_grad=True), False),
    (dpo_loss, ("ref_logprobs",), dict(loss_type="sigmoid"), True),
    (dpo_loss, ("ref_logprobs",), dict(loss_type="ipo", rpo_alpha=0.3), True),
    (dil_loss, ("ref_logprobs",), dict(variant="lsif"), True),
    (reinforce_loss, ("rewards", "init_logprobs"), dict(kl_coef=0.2, whiten=True), False),
]


@pytest.mark.parametrize("poison,grad_in_forward", [(math.nan, None), (-math.inf, False)])
@pytest.mark.parametrize("fn,names,options,paired", PER_TOKEN_INPUTS,
                         ids=lambda v: getattr(v, "__name__", None) or "")
def test_nan_at_ignored_positions_never_reaches_the_loss(fn, names, options, paired, poison,
                                                         grad_in_forward):
    hidden, weight, labels, _ = pairs() if paired else batch()
    clean = {name: naive.labels_logps(hidden.detach(), weight.detach(), labels)[0]
             + 0.3 * torch.randn(labels.shape, dtype=F64) for name in names}
    clean = {k: v * (labels != -100) for k, v in clean.items()}
    kw = dict(options, grad_in_forward=grad_in_forward, **TORCH)
    want = fn(hidden, weight, labels, **clean, **kw)
    poisoned = {k: _poisoned(v, labels, poison) for k, v in clean.items()}
    got = fn(hidden, weight, labels, **poisoned, **kw)
    assert torch.isfinite(got.loss)
    assert_close(got.loss, want.loss.detach(), F64, name="loss")
    for g, w in zip(grads(got.loss, hidden, weight), grads(want.loss, hidden, weight)):
        assert torch.isfinite(g).all()
        assert_close(g, w, F64, name="grad")
    for name, value in got.metrics.items():
        assert_close(value, want.metrics[name], F64, name=name)


EVERY_LOSS = [
    (sft_loss, dict(), False), (sft_loss, dict(divergence="kl", ref=True), False),
    (dpo_loss, dict(ref=True), True), (dpo_loss, dict(ref=True, loss_type="bco_pair"), True),
    (simpo_loss, dict(), True), (orpo_loss, dict(), True), (cpo_loss, dict(), True),
    (dil_loss, dict(ref=True), True), (reinforce_loss, dict(rewards=True), False),
]


@pytest.mark.parametrize("fn,options,paired", EVERY_LOSS,
                         ids=lambda v: getattr(v, "__name__", None) or "")
def test_empty_batch_is_a_zero_loss(fn, options, paired):
    """B = 0 gives 0 (not 0/0), with finite metrics and zero gradients, like sft_loss."""
    hidden, weight, labels, _ = pairs() if paired else batch()
    hidden, labels = hidden[:0], labels[:0]
    options = dict(options)
    if options.pop("ref", False):
        options["ref_logprobs"] = torch.zeros(labels.shape, dtype=F64)
    if options.pop("rewards", False):
        options["rewards"] = torch.zeros(labels.shape, dtype=F64)
    out = fn(hidden, weight, labels, **options, **TORCH)
    assert float(out.loss.detach()) == 0.0
    assert all(math.isfinite(float(v)) for v in out.metrics.values()), out.metrics
    (dw,) = torch.autograd.grad(out.loss, weight, allow_unused=True)
    assert dw is None or torch.count_nonzero(dw) == 0


def _needed(fn):
    """(positional, keyword) arguments of a valid call of ``fn``."""
    hidden, weight, labels, _ = pairs()
    rows, per_token = labels.shape[0], torch.zeros(labels.shape, dtype=F64)
    if fn in (ift_loss, token_logprobs, token_rewards):
        model = tiny_model("llama")
        input_ids, lm_labels, _ = lm_batch()
        models = (model, model) if fn is token_rewards else (model,)
        return (*models, input_ids, lm_labels), {}
    return {
        distill_loss: ((hidden, weight, hidden.detach(), weight.detach(), labels), {}),
        grpo_loss: ((hidden, weight, labels, torch.zeros(rows, dtype=F64)), {}),
        ppo_loss: ((hidden, weight, labels, per_token), dict(old_logprobs=per_token)),
        kto_loss: ((hidden, weight, labels, torch.ones(rows, dtype=torch.bool)),
                   dict(ref_logprobs=per_token)),
        reinforce_loss: ((hidden, weight, labels), dict(rewards=per_token)),
    }.get(fn, ((hidden, weight, labels), {}))


PUBLIC_OBJECTIVES = [sft_loss, dpo_loss, simpo_loss, orpo_loss, cpo_loss, dil_loss,
                     reinforce_loss, grpo_loss, ppo_loss, kto_loss, distill_loss, ift_loss,
                     token_logprobs, token_rewards]


def test_every_public_objective_is_checked_for_unknown_keywords():
    """A new public objective (``*_loss``, or one passing options on to the primitive)
    joins ``PUBLIC_OBJECTIVES``."""
    public = [getattr(objectives, name) for name in objectives.__all__]
    takes_options = [fn for fn in public if inspect.isfunction(fn) and (
        fn.__name__.endswith("_loss") or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                             for p in inspect.signature(fn).parameters.values()))]
    assert set(takes_options) == set(PUBLIC_OBJECTIVES)


@pytest.mark.parametrize("fn", PUBLIC_OBJECTIVES, ids=lambda f: f.__name__)
def test_unknown_keyword_names_the_public_function(fn):
    """Was a TypeError from linear_logprobs (or silently swallowed), or from grpo_loss for
    ppo_loss; now Python's own wording, for the function the user called, with a hint
    where the function takes the primitive's options through ``**`` (a function with a
    closed signature gets Python's own error, which names it too)."""
    args, kwargs = _needed(fn)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD
                     for p in inspect.signature(fn).parameters.values())
    hint = r"; did you mean 'temperature'\?" if open_ended else ""
    with pytest.raises(TypeError, match=rf"^{fn.__name__}\(\) got an unexpected keyword "
                                        rf"argument 'temprature'{hint}"):
        fn(*args, **kwargs, temprature=2.0, **TORCH)


@pytest.mark.parametrize("name", [n for n in fused_losses.__all__
                                  if n.startswith("Fused") and n != "FusedLoss"])
def test_modules_refuse_unknown_options_by_name(name):
    with pytest.raises(TypeError, match=rf"{name} got unknown option\(s\) \['nonsense'\]"):
        getattr(fused_losses, name)(nonsense=1)
