"""The DPO family against naive float64 implementations of TRL's formulas."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from fused_losses import FusedDPOLoss, dpo_loss
from fused_losses.objectives import DPO_LOSSES
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.naive import grads, halves, pairs, ref_for

F64 = torch.float64
TORCH = dict(backend="torch")


def naive_dpo(hidden, weight, labels, ref, *, loss_type, beta, eps=0.0, average=False,
              rpo_alpha=None, bias=None, tau=0.05, delta=None):
    logps, _, mask = naive.labels_logps(hidden, weight, labels, bias)
    average = average or loss_type == "ipo"
    rho = naive.seq(logps, mask, average) - naive.seq(ref, mask, average)
    w, l = halves(rho)
    loss = naive.dpo_pair(loss_type, w, l, beta, eps, tau, delta).mean()
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * naive.chosen_nll(logps, mask)
    return loss


def _check(loss, expected, hidden, weight, bias=None):
    assert_close(loss, expected, F64, scale=10, name="loss")
    for got, want, name in zip(grads(loss, hidden, weight, bias),
                               grads(expected, hidden, weight, bias), ("dH", "dW", "db")):
        assert_close(got, want, F64, scale=10, name=name)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type_matches_naive(loss_type, average):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    beta = 0.1 if average is False else 2.0  # summed: β·h = O(1); averaged: larger β
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type=loss_type, beta=beta,
                   average_log_prob=average, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type=loss_type, beta=beta,
                         average=average)
    _check(out.loss, expected, hidden, weight)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair"])
def test_label_smoothing(loss_type):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type=loss_type,
                   label_smoothing=0.2, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type=loss_type, beta=0.1, eps=0.2)
    _check(out.loss, expected, hidden, weight)


def test_rpo_alpha_bias_and_reference_from_hidden():
    hidden, weight, labels, bias = pairs(bias=True)
    ref_hidden, ref_weight = torch.randn_like(hidden.detach()), torch.randn_like(weight.detach())
    ref_bias = torch.randn(weight.shape[0], dtype=F64)
    ref = naive.labels_logps(ref_hidden, ref_weight, labels, ref_bias)[0]
    out = dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                   ref_weight=ref_weight, ref_bias=ref_bias, rpo_alpha=0.5, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type="sigmoid", beta=0.1,
                         rpo_alpha=0.5, bias=bias)
    _check(out.loss, expected, hidden, weight, bias)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels, bias.detach())
    assert_close(out.metrics["nll_loss"], naive.chosen_nll(logps, mask), F64, name="nll")


def test_discopop_tau():
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type="discopop", beta=0.5,
                   discopop_tau=0.3, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type="discopop", beta=0.5, tau=0.3)
    _check(out.loss, expected, hidden, weight)


def test_metrics_against_hand_computed_values():
    hidden, weight, labels, _ = pairs(B=3)
    ref = ref_for(hidden, weight, labels, spread=2.0)
    beta = 0.5
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=beta, **TORCH)
    h, w = hidden.detach(), weight.detach()
    logps, _, mask = naive.labels_logps(h, w, labels)
    S = naive.seq(logps, mask, False)
    rho = S - naive.seq(ref, mask, False)
    r_w, r_l = halves(beta * rho)
    z = naive.logits_of(h, w)
    # hidden position t-1 predicts label t: the mean logit over vocab and scored tokens
    pred_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    mean_logit = z.mean(-1)
    chosen_mask, rejected_mask = halves(pred_mask)
    want = {
        "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
        "rewards/accuracies": (r_w > r_l).double().mean(), "rewards/margins": (r_w - r_l).mean(),
        "logps/chosen": halves(S)[0].mean(), "logps/rejected": halves(S)[1].mean(),
        "logits/chosen": (halves(mean_logit)[0] * chosen_mask).sum() / chosen_mask.sum(),
        "logits/rejected": (halves(mean_logit)[1] * rejected_mask).sum() / rejected_mask.sum(),
    }
    for name, value in want.items():
        assert_close(out.metrics[name], value, F64, name=name)
        assert not out.metrics[name].requires_grad and out.metrics[name].dim() == 0


def test_accuracies_count_strict_wins():
    """Hand-built rewards: pairs where the chosen wins, loses and ties."""
    hidden, weight, labels, _ = pairs(B=3)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    S = naive.seq(logps, mask, False)
    margins = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)  # ρ = +1, -1, 0 | 0
    ref = logps.clone()
    first = mask.double().argmax(-1)  # move the wanted ρ onto each row's first scored token
    ref[torch.arange(6), first] -= margins
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=1.0, **TORCH)
    assert_close(out.metrics["rewards/accuracies"], torch.tensor(1 / 3, dtype=F64), F64)
    assert_close(out.metrics["rewards/margins"], torch.tensor(0.0, dtype=F64), F64)
    assert_close(out.metrics["logps/chosen"], halves(S)[0].mean(), F64)


def test_bco_pair_running_mean_in_the_module():
    hidden, weight, labels, _ = pairs()
    module = FusedDPOLoss(loss_type="bco_pair", beta=0.3, backend="torch")
    deltas, batch_means = [], []
    for step in range(3):
        ref = ref_for(hidden, weight, labels, spread=1.0 + step)
        logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
        rho = naive.seq(logps, mask, False) - naive.seq(ref, mask, False)
        batch_means.append(0.3 * rho.mean())
        delta = torch.stack(batch_means).mean()  # the running mean over batches, this one in
        out = module(hidden, weight, labels, ref_logprobs=ref)
        w, l = halves(rho)
        # the loss uses δ including this batch, as TRL's RunningMoments.update then .mean
        expected = naive.dpo_pair("bco_pair", w, l, 0.3, delta=delta).mean()
        assert_close(out.loss, expected, F64, name=f"loss step {step}")
        deltas.append(float(module.bco_delta))
        assert_close(module.bco_delta.double(), delta, torch.float32, name="delta")
    assert float(module.bco_count) == 3
    assert "bco_delta" in module.state_dict()
    module.eval()
    module(hidden, weight, labels, ref_logprobs=ref)
    assert float(module.bco_count) == 3  # eval does not move the running mean


def test_discopop_finite_for_large_margins():
    hidden, weight, labels, _ = pairs()
    ref = torch.zeros(labels.shape, dtype=F64)
    for shift in (-1e4, 1e4):
        ref2 = ref.clone()
        ref2[: labels.shape[0] // 2, -2] = shift
        out = dpo_loss(hidden, weight, labels, ref_logprobs=ref2, loss_type="discopop",
                       beta=1.0, **TORCH)
        dh, dw = grads(out.loss, hidden, weight)
        assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_bad_inputs_are_clear_errors():
    hidden, weight, labels, _ = pairs()
    ref = torch.zeros(labels.shape, dtype=F64)
    with pytest.raises(ValueError, match="odd number"):
        dpo_loss(hidden[:3], weight, labels[:3], ref_logprobs=ref[:3], **TORCH)
    with pytest.raises(ValueError, match="loss_type must be one of .*'ipo'.*'sigmoid'"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type="dpo", **TORCH)
    with pytest.raises(ValueError, match="beta must be a positive number"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=-0.1, **TORCH)
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of labels"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref[:, 1:], **TORCH)
    with pytest.raises(ValueError, match="needs a reference"):
        dpo_loss(hidden, weight, labels, **TORCH)
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, label_smoothing=0.5, **TORCH)
    with pytest.raises(ValueError, match="not both"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, ref_hidden=hidden.detach(),
                 ref_weight=weight.detach(), **TORCH)


# ------------------------------------------------------------------------------------------
# Against the peers' own implementations, where they install (they are not dependencies).
# ------------------------------------------------------------------------------------------

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None


LIGER_TOL = torch.float32
LIGER_TYPES = ["sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]  # Liger has no ipo; its bco_pair keeps no running mean


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed (optional peer; "
                    "`pip install liger-kernel` to compare against LigerFusedLinearDPOLoss)")
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_dpo_matches_liger(loss_type, average):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden, weight, labels, _ = pairs()
    ref_hidden, ref_weight = torch.randn_like(hidden.detach()), weight.detach().clone()
    smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    ours = dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                    beta=0.1, average_log_prob=average, loss_type=loss_type,
                    label_smoothing=smoothing, **TORCH)
    # Liger takes aligned inputs: shift ourselves (hidden[:, t] predicts labels[:, t+1]).
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    liger = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=True,
                                    average_log_prob=average, compiled=False,
                                    loss_type=loss_type, label_smoothing=smoothing)
    loss, aux = liger(w, h[:, :-1], labels[:, 1:].contiguous(), None,
                      ref_hidden[:, :-1].contiguous(), ref_weight, None)
    # Liger accumulates in float32 whatever the input dtype: compare at float32 tolerance.
    assert_close(ours.loss, loss, LIGER_TOL, name="loss vs Liger")
    for got, want, name in zip(grads(ours.loss, hidden, weight), grads(loss, h, w),
                               ("dH", "dW")):
        assert_close(got, want, LIGER_TOL, name=f"{name} vs Liger")
    chosen_logps, rejected_logps = aux[0], aux[1]
    assert_close(ours.metrics["logps/chosen"], chosen_logps.mean(), LIGER_TOL)
    assert_close(ours.metrics["logps/rejected"], rejected_logps.mean(), LIGER_TOL)
    # (Liger's logits/* average over every position, prompt and padding included; ours, as
    # TRL's, over scored tokens only, so those are not compared.)


class _FusedHeadStub(torch.nn.Module):
    """Stands in for a model patched with TRL's fused head: returns fixed per-token log-probs
    (TRL's shifted layout, [2B, T-1]) and neutral metric fields, so TRL's own loss code runs."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, *, labels, fused_lm_head, **_):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def trl_dpo_loss(loss_type, logps, ref, mask, *, beta, label_smoothing):
    """TRL >= 1.16's ``DPOTrainer._compute_loss`` on these per-token log-probs (labels
    layout [2B, T]) with a precomputed reference: TRL's own code, not a transcription."""
    from collections import defaultdict

    from trl import DPOTrainer

    identity = SimpleNamespace(device=logps.device, gather=lambda t: t,
                               gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=0.05), use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    ref_seq = (ref * mask).sum(-1)
    inputs = dict(input_ids=torch.zeros(mask.shape, dtype=torch.long),
                  attention_mask=torch.ones(mask.shape, dtype=torch.long),
                  completion_mask=mask.long(), ref_chosen_logps=halves(ref_seq)[0],
                  ref_rejected_logps=halves(ref_seq)[1])
    model = _FusedHeadStub((logps * mask)[:, 1:])
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


# TRL >= 1.16 dropped label smoothing from "sigmoid" and takes exo_pair's ε as given (no
# 1e-3 default), so each loss type is compared at a smoothing both define the same way.
TRL_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}


@pytest.mark.skipif(not HAS_TRL, reason="trl not installed (a dev dependency: "
                    "`pip install -e .[dev]`)")
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "exo_pair",
                                       "nca_pair", "sppo_hard", "apo_zero", "apo_down",
                                       "discopop"])
def test_pair_losses_match_trl(loss_type):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    smoothing = TRL_SMOOTHING.get(loss_type, 0.0)
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type=loss_type,
                   label_smoothing=smoothing, **TORCH)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    want = trl_dpo_loss(loss_type, logps, ref, mask, beta=0.1, label_smoothing=smoothing)
    # TRL builds exo_pair's ε as a float32 tensor, so its log(ε) terms carry fp32 rounding.
    tolerance = torch.float32 if loss_type == "exo_pair" else F64
    assert_close(out.loss, want, tolerance, scale=10, name=f"loss vs TRL {loss_type}")
