"""The nn.Module wrappers are the functionals with stored options."""
import pytest
import torch

import fused_losses
from fused_losses import (FusedCPOLoss, FusedDILLoss, FusedDPOLoss, FusedORPOLoss,
                          FusedSFTLoss, FusedSimPOLoss, cpo_loss, dil_loss, dpo_loss, orpo_loss,
                          sft_loss, simpo_loss)
from tests.helpers import assert_close
from tests.objectives.naive import batch

F64 = torch.float64


@pytest.mark.parametrize("module_cls,fn,options,needs_ref", [
    (FusedSFTLoss, sft_loss, dict(divergence="gan", beta=0.5), True),
    (FusedDPOLoss, dpo_loss, dict(loss_type="ipo", beta=0.3), True),
    (FusedSimPOLoss, simpo_loss, dict(gamma=0.2), False),
    (FusedORPOLoss, orpo_loss, dict(lam=0.5), False),
    (FusedCPOLoss, cpo_loss, dict(alpha=0.0), False),
    (FusedDILLoss, dil_loss, dict(variant="ukl"), True),
])
def test_module_equals_functional(module_cls, fn, options, needs_ref):
    hidden, weight, labels, _ = batch(rows=4)
    extra = dict(ref_logprobs=torch.randn(labels.shape, dtype=F64) * 0.1) if needs_ref else {}
    module = module_cls(backend="torch", **options)
    a = module(hidden, weight, labels, **extra)
    b = fn(hidden, weight, labels, backend="torch", **options, **extra)
    assert_close(a.loss, b.loss.detach(), F64)
    assert a.metrics.keys() == b.metrics.keys()
    assert isinstance(a, fused_losses.LossOutput)
    assert all(not v.requires_grad and v.dim() == 0 for v in a.metrics.values())
    # a keyword at call time overrides the stored one
    c = module(hidden, weight, labels, **{**extra, "backend": "torch"})
    assert_close(c.loss, b.loss.detach(), F64)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"FusedDPOLoss got unknown option\(s\) \['betta'\]"):
        FusedDPOLoss(betta=0.1)
    assert "beta=0.2" in repr(FusedSFTLoss(beta=0.2))


def test_public_names():
    for name in ("sft_loss", "dpo_loss", "simpo_loss", "orpo_loss", "cpo_loss", "dil_loss",
                 "ift_loss", "reinforce_loss", "token_rewards", "token_logprobs", "LossOutput",
                 "FusedSFTLoss", "FusedDPOLoss", "FusedReinforceLoss", "FusedIFTLoss"):
        assert name in fused_losses.__all__ and hasattr(fused_losses, name)


def test_token_accuracy_and_entropy_metrics():
    """return_argmax / return_entropy add TRL's mean_token_accuracy and entropy, computed over
    the scored tokens, for SFT (also in sequence mode, where a dummy target is added) and
    for the preference losses (where return_logits_mean is already requested: no clash)."""
    from tests.objectives import naive

    hidden, weight, labels, _ = batch(rows=4)
    z = naive.logits_of(hidden.detach(), weight.detach())[:, :-1]
    mask = labels[:, 1:] != -100
    half = mask & (torch.arange(mask.shape[1]) % 2 == 0)  # make about half the tokens hits
    labels[:, 1:][half] = z.argmax(-1)[half]
    hits = (z.argmax(-1) == labels[:, 1:])[mask].double().mean()
    assert 0.2 < float(hits) < 1.0
    p = z.softmax(-1)
    entropy = (-(p * p.log()).sum(-1))[mask].mean()
    ref = torch.zeros(labels.shape, dtype=F64)
    outs = [
        sft_loss(hidden, weight, labels, return_argmax=True, return_entropy=True,
                 backend="torch"),
        sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence="kl",
                 value_mode="sequence", return_argmax=True, return_entropy=True,
                 backend="torch"),
        FusedDPOLoss(return_argmax=True, return_entropy=True, return_logits_mean=True,
                     backend="torch")(hidden, weight, labels, ref_logprobs=ref),
        simpo_loss(hidden, weight, labels, return_argmax=True, return_entropy=True,
                   backend="torch"),
    ]
    for out in outs:
        assert_close(out.metrics["mean_token_accuracy"], hits, F64, name="accuracy")
        assert_close(out.metrics["entropy"], entropy, F64, name="entropy")
        out.loss.backward()  # the entropy output gets no gradient: skipped in backward
    assert "entropy" not in sft_loss(hidden, weight, labels, backend="torch").metrics
