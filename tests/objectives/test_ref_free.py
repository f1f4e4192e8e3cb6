"""SimPO, ORPO and CPO against naive float64 implementations (and Liger's, if installed)."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from fused_losses import cpo_loss, orpo_loss, simpo_loss
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.naive import grads, halves, pairs

F64 = torch.float64
TORCH = dict(backend="torch")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _check(loss, expected, hidden, weight, bias=None, dtype=F64, scale=10):
    assert_close(loss, expected, dtype, scale=scale, name="loss")
    for got, want, name in zip(grads(loss, hidden, weight, bias),
                               grads(expected, hidden, weight, bias), ("dH", "dW", "db")):
        assert_close(got, want, dtype, scale=scale, name=name)


def naive_simpo(hidden, weight, labels, beta, gamma, eps):
    logps, _, mask = naive.labels_logps(hidden, weight, labels)
    w, l = halves(naive.seq(logps, mask, True))
    x = beta * (w - l) - gamma
    return (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean()


def naive_orpo(hidden, weight, labels, lam, bias=None):
    logps, _, mask = naive.labels_logps(hidden, weight, labels, bias)
    # Ā just below 0 (the documented guard): a row of certain, or no, tokens stays finite
    w, l = (a.clamp_max(-torch.finfo(F64).tiny) for a in halves(naive.seq(logps, mask, True)))
    log_odds = (w - l) - (torch.log(-torch.expm1(w)) - torch.log(-torch.expm1(l)))
    return naive.chosen_nll(logps, mask) - lam * F.logsigmoid(log_odds).mean(), log_odds


def naive_cpo(hidden, weight, labels, beta, alpha, eps, average):
    logps, _, mask = naive.labels_logps(hidden, weight, labels)
    w, l = halves(naive.seq(logps, mask, average))
    x = beta * (w - l)
    pref = (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean()
    return pref + alpha * naive.chosen_nll(logps, mask)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_matches_naive(eps):
    hidden, weight, labels, _ = pairs()
    out = simpo_loss(hidden, weight, labels, beta=2.5, gamma=0.7, label_smoothing=eps, **TORCH)
    _check(out.loss, naive_simpo(hidden, weight, labels, 2.5, 0.7, eps), hidden, weight)


def test_simpo_defaults_and_metrics():
    hidden, weight, labels, _ = pairs(B=3)
    out = simpo_loss(hidden, weight, labels, **TORCH)
    assert_close(out.loss, naive_simpo(hidden, weight, labels, 2.0, 0.5, 0.0).detach(), F64)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    w, l = halves(naive.seq(logps, mask, True))
    assert_close(out.metrics["rewards/chosen"], (2.0 * w).mean(), F64)
    assert_close(out.metrics["rewards/margins"], (2.0 * (w - l)).mean(), F64)
    assert_close(out.metrics["rewards/accuracies"], (w > l).double().mean(), F64)
    assert_close(out.metrics["logps/rejected"], l.mean(), F64)


def test_orpo_matches_naive_with_bias():
    hidden, weight, labels, bias = pairs(bias=True)
    out = orpo_loss(hidden, weight, labels, bias=bias, lam=0.3, **TORCH)
    expected, log_odds = naive_orpo(hidden, weight, labels, 0.3, bias)
    _check(out.loss, expected, hidden, weight, bias)
    assert_close(out.metrics["log_odds_chosen"], log_odds.detach().mean(), F64)
    assert_close(out.metrics["log_odds_ratio"], F.logsigmoid(log_odds.detach()).mean(), F64)


def test_orpo_finite_when_a_sequence_is_certain():
    hidden, weight, labels, _ = pairs()
    w = weight.detach().clone()
    w[labels[0, 3]] *= 0  # make one token certain: a huge logit for it everywhere
    w[labels[0, 3], 0] = 1e4
    w.requires_grad_()
    out = orpo_loss(hidden, w, labels, **TORCH)
    dh, dw = grads(out.loss, hidden, w)
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cpo_matches_naive(eps, average):
    hidden, weight, labels, _ = pairs()
    out = cpo_loss(hidden, weight, labels, beta=0.2, alpha=0.7, label_smoothing=eps,
                   average_log_prob=average, **TORCH)
    _check(out.loss, naive_cpo(hidden, weight, labels, 0.2, 0.7, eps, average), hidden, weight)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    assert_close(out.metrics["nll_loss"], naive.chosen_nll(logps, mask), F64)


@pytest.mark.parametrize("fn", [simpo_loss, orpo_loss, cpo_loss])
def test_bad_inputs(fn):
    hidden, weight, labels, _ = pairs()
    with pytest.raises(ValueError, match="odd number"):
        fn(hidden[:3], weight, labels[:3], **TORCH)
    bad = {"simpo_loss": "beta", "orpo_loss": "lam", "cpo_loss": "beta"}[fn.__name__]
    with pytest.raises(ValueError, match=f"{bad} must be a positive finite number"):
        fn(hidden, weight, labels, **{bad: 0.0}, **TORCH)
    assert math.isfinite(float(fn(hidden, weight, labels, **TORCH).loss.detach()))


# ------------------------------------------------------------------------------------------
# Liger's own implementations (optional peer). Liger accumulates in float32: compare there.
# ------------------------------------------------------------------------------------------

def _liger(cls, hidden, weight, labels, **options):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = cls(compiled=False, **options)(w, h[:, :-1], labels[:, 1:].contiguous())
    loss = out[0] if isinstance(out, tuple) else out
    return loss, h, w


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed (optional peer)")
def test_simpo_orpo_cpo_match_liger():
    from liger_kernel.chunked_loss import (LigerFusedLinearCPOLoss, LigerFusedLinearORPOLoss,
                                           LigerFusedLinearSimPOLoss)

    hidden, weight, labels, _ = pairs()
    cases = [
        (simpo_loss(hidden, weight, labels, beta=2.0, gamma=0.5, label_smoothing=0.1, **TORCH),
         _liger(LigerFusedLinearSimPOLoss, hidden, weight, labels, beta=2.0, gamma=0.5,
                label_smoothing=0.1, compute_nll_loss=False)),
        (orpo_loss(hidden, weight, labels, lam=0.1, **TORCH),
         _liger(LigerFusedLinearORPOLoss, hidden, weight, labels, beta=0.1,
                compute_nll_loss=True)),
        (cpo_loss(hidden, weight, labels, beta=0.1, alpha=1.0, **TORCH),
         _liger(LigerFusedLinearCPOLoss, hidden, weight, labels, beta=0.1, alpha=1.0,
                compute_nll_loss=True)),
    ]
    for ours, (theirs, h, w) in cases:
        assert_close(ours.loss, theirs, torch.float32, scale=10, name="loss vs Liger")
        for got, want, name in zip(grads(ours.loss, hidden, weight), grads(theirs, h, w),
                                   ("dH", "dW")):
            assert_close(got, want, torch.float32, scale=10, name=f"{name} vs Liger")


@pytest.mark.parametrize("fn,ours,trl,value", [
    (orpo_loss, "lam", "beta", 0.3), (simpo_loss, "gamma", "simpo_gamma", 0.8),
    (cpo_loss, "alpha", "cpo_alpha", 0.4)])
def test_trl_names_are_aliases(fn, ours, trl, value):
    """A TRL user's hyper-parameter name means what it means in TRL; given with ours, a
    TypeError names both."""
    hidden, weight, labels, _ = pairs()
    a = fn(hidden, weight, labels, **{ours: value}, **TORCH)
    b = fn(hidden, weight, labels, **{trl: value}, **TORCH)
    assert_close(b.loss, a.loss.detach(), F64)
    with pytest.raises(TypeError, match=f"{fn.__name__}\\(\\) got both {ours}=.* and {trl}="):
        fn(hidden, weight, labels, **{ours: value / 2, trl: value}, **TORCH)
    with pytest.raises(ValueError, match=f"{trl} must be a"):
        fn(hidden, weight, labels, **{trl: float("inf")}, **TORCH)
