"""DIL against a naive float64 implementation; the ``dpo`` variant against dpo_loss."""
import pytest
import torch
import torch.nn.functional as F

from fused_losses import dil_loss, dpo_loss
from fused_losses.objectives import DIL_LOSSES
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.naive import grads, halves, pairs, ref_for

F64 = torch.float64
TORCH = dict(backend="torch")


def naive_dil(hidden, weight, labels, ref, variant, average=True, beta=0.1, clamp=None):
    logps, _, mask = naive.labels_logps(hidden, weight, labels)
    pol = naive.seq(logps, mask, average)
    rho = pol - naive.seq(ref, mask, average)
    if clamp is not None:
        rho = torch.minimum(rho, torch.tensor(clamp, dtype=F64))
    w, l = halves(rho)
    if variant == "lsif":
        per = -torch.exp(w) + 0.5 * torch.exp(2 * l)
    elif variant == "ukl":
        per = -halves(pol)[0] + torch.exp(l)
    elif variant == "bce":
        per = -F.logsigmoid(w) - F.logsigmoid(-l)
    else:
        per = -F.logsigmoid(beta * (w - l))
    return per.mean(), rho.detach()


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("variant", sorted(DIL_LOSSES))
def test_variants_match_naive(variant, average):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    out = dil_loss(hidden, weight, labels, ref_logprobs=ref, variant=variant,
                   average_log_prob=average, beta=0.4, **TORCH)
    expected, rho = naive_dil(hidden, weight, labels, ref, variant, average, beta=0.4)
    assert_close(out.loss, expected, F64, scale=10, name="loss")
    for got, want, name in zip(grads(out.loss, hidden, weight), grads(expected, hidden, weight),
                               ("dH", "dW")):
        assert_close(got, want, F64, scale=10, name=name)
    w, l = halves(rho)
    scale = 0.4 if variant == "dpo" else 1.0
    assert_close(out.metrics["density_ratio/chosen"], torch.exp(w).mean(), F64)
    assert_close(out.metrics["density_ratio/rejected"], torch.exp(l).mean(), F64)
    assert_close(out.metrics["rewards/chosen"], scale * w.mean(), F64)
    assert_close(out.metrics["rewards/accuracies"], (w > l).double().mean(), F64)
    assert "density_ratio/clamped" not in out.metrics


def test_dpo_variant_is_dpo_on_length_normalised_logps():
    hidden, weight, labels, _ = pairs(B=3)
    ref = ref_for(hidden, weight, labels)
    a = dil_loss(hidden, weight, labels, ref_logprobs=ref, variant="dpo", beta=0.3, **TORCH)
    b = dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=0.3, average_log_prob=True,
                 **TORCH)
    assert_close(a.loss, b.loss.detach(), F64, name="loss")
    for got, want in zip(grads(a.loss, hidden, weight), grads(b.loss, hidden, weight)):
        assert_close(got, want, F64)
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "logits/rejected"):
        assert_close(a.metrics[name], b.metrics[name], F64, name=name)


def test_max_log_ratio_clamps_and_reports():
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    ref[:2] -= 50.0  # the chosen rows' ρ is huge: exp would overflow in float32
    out = dil_loss(hidden, weight, labels, ref_logprobs=ref, max_log_ratio=5.0, **TORCH)
    expected, rho = naive_dil(hidden, weight, labels, ref, "lsif", clamp=5.0)
    assert_close(out.loss, expected, F64, name="loss")
    assert float(out.metrics["density_ratio/clamped"]) == 0.5
    quiet = dil_loss(hidden, weight, labels, ref_logprobs=ref, max_log_ratio=1e6, **TORCH)
    assert float(quiet.metrics["density_ratio/clamped"]) == 0.0


def test_reference_from_hidden():
    hidden, weight, labels, _ = pairs()
    ref_hidden = torch.randn_like(hidden.detach())
    ref = naive.labels_logps(ref_hidden, weight.detach(), labels)[0]
    a = dil_loss(hidden, weight, labels, ref_logprobs=ref, variant="bce", **TORCH)
    b = dil_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight.detach(),
                 variant="bce", **TORCH)
    assert_close(a.loss, b.loss.detach(), F64)


def test_bad_inputs():
    hidden, weight, labels, _ = pairs()
    ref = torch.zeros(labels.shape, dtype=F64)
    with pytest.raises(ValueError, match=r"variant must be one of \['bce', 'dpo', 'lsif', 'ukl'\]"):
        dil_loss(hidden, weight, labels, ref_logprobs=ref, variant="kliep", **TORCH)
    with pytest.raises(ValueError, match="odd number"):
        dil_loss(hidden[:1], weight, labels[:1], ref_logprobs=ref[:1], **TORCH)
    with pytest.raises(ValueError, match="needs a reference"):
        dil_loss(hidden, weight, labels, **TORCH)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dil_loss(hidden, weight, labels, ref_logprobs=ref, variant="dpo", beta=0, **TORCH)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight go together"):
        dil_loss(hidden, weight, labels, ref_hidden=hidden.detach(), **TORCH)


@pytest.mark.parametrize("average", [True, False])
def test_trl_per_sequence_reference_equals_per_token(average):
    """TRL's summed per-sequence references, length-normalised here when DIL averages."""
    hidden, weight, labels, _ = pairs(B=3)
    ref = ref_for(hidden, weight, labels)
    chosen, rejected = halves(ref.sum(-1))
    a = dil_loss(hidden, weight, labels, ref_logprobs=ref, average_log_prob=average, **TORCH)
    b = dil_loss(hidden, weight, labels, ref_chosen_logps=chosen, ref_rejected_logps=rejected,
                 average_log_prob=average, **TORCH)
    assert_close(b.loss, a.loss.detach(), F64, name="loss")
    for got, want in zip(grads(b.loss, hidden, weight), grads(a.loss, hidden, weight)):
        assert_close(got, want, F64)
